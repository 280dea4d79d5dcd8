//! libFuzzer entry for [`vmcp_fuzz::create_request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmcp_fuzz::create_request::run(data);
});
