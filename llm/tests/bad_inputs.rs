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

fn user(text: &str) -> Vec<nccl_llm::chat::Message> {
    vec![nccl_llm::chat::Message {
        role: "user".into(),
        content: text.into(),
    }]
}

/// A chat template is outside data (it comes from the model file): one that loops 10^7 times runs out of
/// its instruction budget instead of running on (10^10 iterations would take hours).
#[test]
fn runaway_chat_template_is_stopped_by_its_budget() {
    let t = "{% for i in range(100000) %}{% for j in range(100) %}x{% endfor %}{% endfor %}";
    let e = match nccl_llm::chat::render(t, &user("hi"), "", "") {
        Ok(s) => panic!("a 10^7-iteration template rendered ({} bytes)", s.len()),
        Err(e) => e,
    };
    assert!(matches!(e, EngineError::Template(_)), "{e:?}");
    assert!(e.to_string().contains("fuel"), "{e}");
    // A real template with a long conversation stays far inside the budget.
    let smol = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let long: Vec<_> = (0..2000).flat_map(|i| user(&format!("message {i}"))).collect();
    let s = nccl_llm::chat::render(smol, &long, "", "").unwrap();
    assert!(s.ends_with("<|im_start|>assistant\n") && s.contains("message 1999"));
}

/// Found by the `gguf` fuzz target (crash-e77dc2b2): an empty tensor in a file that ends before its aligned
/// data section made `tensor_bytes` slice past the end (a panic). Now the file is refused when parsed.
#[test]
fn gguf_whose_data_section_starts_past_the_end_is_refused() {
    use nccl_llm::model::gguf::{GgufFile, GgufSource};
    use nccl_llm::model::ModelError;
    const CRASH: [u8; 86] = [
        0x47, 0x47, 0x55, 0x46, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0b, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x27,
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1c,
    ];
    let e = GgufFile::from_bytes("crash.gguf", CRASH.to_vec()).unwrap_err();
    assert!(matches!(e, ModelError::Malformed { .. }), "{e:?}");
    assert!(e.to_string().contains("past the end"), "{e}");
    // The same shape built on purpose: one tensor with a zero dimension, and no bytes after its directory.
    let mut v = b"GGUF".to_vec();
    v.extend(3u32.to_le_bytes());
    v.extend(1u64.to_le_bytes()); // tensors
    v.extend(0u64.to_le_bytes()); // metadata
    v.extend(1u64.to_le_bytes());
    v.push(b't');
    v.extend(2u32.to_le_bytes());
    v.extend(0u64.to_le_bytes());
    v.extend(4u64.to_le_bytes());
    v.extend(0u32.to_le_bytes()); // F32
    v.extend(0u64.to_le_bytes()); // offset
    let e = GgufFile::from_bytes("empty.gguf", v.clone()).unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    // Padded to the alignment, the same file is fine, and its empty tensor is empty.
    v.resize(v.len().div_ceil(32) * 32, 0);
    let f = GgufFile::from_bytes("empty.gguf", v).unwrap();
    assert_eq!(f.tensor_bytes("t").unwrap(), &[] as &[u8]);
    assert!(matches!(GgufSource::from_file(f), Err(ModelError::Config { .. })));
}

/// Names of this process's threads (Linux truncates them to 15 bytes).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_rank_process_that_exits_before_joining_fails_the_start_at_once_and_frees_the_rendezvous() {
    use nccl_llm::launch::ChildRanks;
    use nccl_llm::shard::Layout;
    // Rank 1 of a TP=2 replica "starts" and exits with code 7 before it joins; for every layout rank 0's
    // rendezvous would otherwise wait NCCL_RS_BOOTSTRAP_TIMEOUT (300 s by default), its thread and port held.
    for layout in [Layout { tp: 2, pp: 1 }, Layout { tp: 2, pp: 2 }] {
        let mut ranks = ChildRanks::new("/bin/sh".into(), vec!["-c".into(), "exit 7".into()], layout);
        let t = std::time::Instant::now();
        let e = match ranks.start() {
            Ok(_) => panic!("{layout:?}: a replica whose rank processes exit was built"),
            Err(e) => e.to_string(),
        };
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "{:?}", t.elapsed());
        assert!(
            e.contains("process exited with code 7 before joining its replica"),
            "{layout:?}: {e}"
        );
        assert!(ranks.pids().is_empty(), "{:?}", ranks.pids());
        let left: Vec<String> = thread_names()
            .into_iter()
            .filter(|n| n.starts_with("rank0-rendez"))
            .collect();
        assert!(
            left.is_empty(),
            "{layout:?}: the rendezvous thread still runs: {left:?}"
        );
    }
}
