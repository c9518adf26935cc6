//! The NBD client facing arbitrary server bytes (greeting, option replies,
//! simple and structured replies).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nbd_server_fuzz::client_session::run(data);
});
