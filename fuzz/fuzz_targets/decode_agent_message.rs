//! Whatever bytes arrive as an agent message: decoding never panics, and what decodes
//! re-encodes to something that decodes to the same message. Compared as bytes, because a
//! NaN float (which an agent may well send) is never equal to itself. Spans that decode
//! go through the controller's admission check, which must refuse or accept, not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use micromine_proto::pb::{AgentMessage, ControllerMessage, EnrollRequest, agent_message::Kind};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = AgentMessage::decode(data) {
        let encoded = message.encode_to_vec();
        let again = AgentMessage::decode(encoded.as_slice())
            .expect("a decoded message re-encodes to something decodable");
        assert_eq!(again.encode_to_vec(), encoded);
        if let Some(Kind::Spans(batch)) = &message.kind {
            // The first span's trace counts as one the controller started, so admission
            // gets past the trace check to everything behind it.
            let known: Vec<[u8; 16]> = batch
                .spans
                .first()
                .and_then(|s| s.trace_id.as_slice().try_into().ok())
                .into_iter()
                .collect();
            for span in &batch.spans {
                let _ = micromine_fleet::span_relay::admit(
                    span,
                    "fuzz",
                    &known,
                    std::time::SystemTime::now(),
                );
            }
        }
    }
    let _ = ControllerMessage::decode(data);
    let _ = EnrollRequest::decode(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<micromine_proto::token::BootstrapToken>();
    }
});
