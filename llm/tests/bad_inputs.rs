//! Bad inputs to the engine's public entry points, each giving a typed error that names what was wrong (the
//! cases of `docs/bad-inputs.md` that no other test file covers). Nothing here needs the real model.

use clap::Parser;
use nccl_llm::cli::{self, Args, Example};
use nccl_llm::error::EngineError;

/// Runs `tp_llama`'s command line (built-in tiny model) in this process and returns the error it gives.
fn cli_error(args: &[&str]) -> EngineError {
    let argv = std::iter::once("tp_llama").chain(args.iter().copied());
    let parsed = Args::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?} should parse: {e}"));
    match cli::run(Example::Tp, parsed) {
        Ok(code) => panic!("{args:?} was accepted (exit code {code})"),
        Err(e) => e,
    }
}

#[test]
fn out_of_range_sampling_flags_are_clear_errors() {
    for (args, needle) in [
        (
            &["--temperature=-1"][..],
            "--temperature: temperature -1 is not a finite number",
        ),
        (&["--temperature", "nan"], "--temperature: temperature NaN"),
        (&["--temperature", "inf"], "--temperature: temperature inf"),
        (&["--top-p", "2"], "--top-p: top-p 2 is not in (0, 1]"),
        (&["--top-p", "0"], "--top-p: top-p 0"),
        (&["--top-p=-0.5", "--temperature", "0.7"], "--top-p: top-p -0.5"),
        (&["--top-p", "NaN", "--temperature", "1"], "--top-p: top-p NaN"),
    ] {
        let e = cli_error(args);
        assert!(matches!(e, EngineError::Config(_)), "{args:?}: {e:?}");
        assert!(e.to_string().contains(needle), "{args:?}: {e}");
    }
}

#[test]
fn in_range_sampling_flags_still_run() {
    let argv = [
        "tp_llama",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--max-new-tokens",
        "2",
        "--tp",
        "1",
    ];
    let args = Args::try_parse_from(argv).unwrap();
    assert_eq!(cli::run(Example::Tp, args).unwrap(), 0);
}
