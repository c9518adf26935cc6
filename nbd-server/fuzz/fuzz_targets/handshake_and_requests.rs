//! A whole client session of arbitrary bytes against an in-memory disk.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nbd_server_fuzz::session::run(data);
});
