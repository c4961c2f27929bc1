//! Whatever bytes arrive as an agent message: decoding never panics, and what decodes
//! re-encodes to something that decodes to the same message. Compared as bytes, because a
//! NaN float (which an agent may well send) is never equal to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use micromine_proto::pb::{AgentMessage, ControllerMessage, EnrollRequest};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = AgentMessage::decode(data) {
        let encoded = message.encode_to_vec();
        let again = AgentMessage::decode(encoded.as_slice())
            .expect("a decoded message re-encodes to something decodable");
        assert_eq!(again.encode_to_vec(), encoded);
    }
    let _ = ControllerMessage::decode(data);
    let _ = EnrollRequest::decode(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<micromine_proto::token::BootstrapToken>();
    }
});
