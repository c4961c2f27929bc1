//! Compiles `micromine/v1/*.proto` with protox (a pure-Rust protobuf compiler), so building
//! needs no system `protoc` and the generated code depends only on the .proto sources.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["micromine/v1/fleet.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        // Ordered maps encode the same message to the same bytes every time (labels, span
        // attributes, trace context), which the fuzz targets and golden tests rely on.
        .btree_map(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
