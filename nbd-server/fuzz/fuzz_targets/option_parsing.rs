//! Option payload and reply codecs on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nbd_server_fuzz::codecs::run(data);
});
