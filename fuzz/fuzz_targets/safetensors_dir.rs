#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nccl_fuzz::safetensors_dir(data));
