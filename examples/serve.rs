//! An OpenAI-compatible inference server on the engine (see `nccl_llm::server`):
//!
//! ```sh
//! cargo run --release --example serve -- --model .deps/models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --tp 2 --dp 2 --port 8000
//! ```
fn main() {
    std::process::exit(nccl_llm::server::cli::main());
}
