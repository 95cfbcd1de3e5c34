//! A worker's `Step` message off the wire: protobuf, then the tensors'
//! bytes, dtypes and shapes and the sequences (`codec::step`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = llmos_proto::worker::v1::StepRequest::decode(data) {
        let _ = llmos_worker::server::codec::step(req);
    }
    if let Ok(resp) = llmos_proto::worker::v1::StepResponse::decode(data) {
        let _ = llmos_worker::server::codec::output(&resp);
    }
});
