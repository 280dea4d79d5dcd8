//! libFuzzer entry for [`vmcp_fuzz::vmm_responses`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmcp_fuzz::vmm_responses::run(data);
});
