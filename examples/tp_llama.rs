//! Tensor-parallel Llama inference on CPU ranks: `cargo run --release --example tp_llama -- --help`.
//!
//! ```text
//! cargo run --release --example tp_llama                       # built-in tiny model, --tp 2
//! cargo run --release --example tp_llama -- --model .deps/models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --tp 2 --chat --prompt "What is the capital of France?"
//! cargo run --release --example tp_llama -- --tp 3 --nprocs 3 # ranks as processes
//! ```

fn main() {
    nccl_stack::init_logging();
    std::process::exit(nccl_llm::cli::main(nccl_llm::cli::Example::Tp));
}
