//! Pipeline-parallel (and 2-D: `--tp` with `--pp`) Llama inference on CPU ranks:
//! `cargo run --release --example pp_llama -- --help`.
//!
//! ```text
//! cargo run --release --example pp_llama                       # built-in tiny model, --pp 2
//! cargo run --release --example pp_llama -- --model .deps/models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --pp 3 --prompt "Once upon a time"
//! cargo run --release --example pp_llama -- --tp 2 --pp 2      # 2-D, 4 ranks
//! ```

fn main() {
    nccl_stack::init_logging();
    std::process::exit(nccl_llm::cli::main(nccl_llm::cli::Example::Pp));
}
