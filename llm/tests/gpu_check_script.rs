//! The run half of scripts/gpu-check.sh on a machine without a GPU (CI, the developers' machines): it must
//! say NO GPU clearly, write that into its report, and exit 3, never pass. The bundle here is a stand-in (the
//! real one is built by `gpu-check.sh build`, too slow for CI): the run half stops before running anything.

use std::path::Path;
use std::process::Command;

#[test]
fn run_half_without_a_gpu_says_so_and_fails() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu-check.sh");
    let dir = std::env::temp_dir().join(format!("nccl-llm-gpu-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy(&script, dir.join("gpu-check.sh")).unwrap();
    std::fs::write(dir.join("MANIFEST"), "commit: test stand-in\n").unwrap();
    // A stand-in test binary that fails loudly if the script ever runs it on this machine.
    let fake = dir.join("bin/kernels_gpu");
    std::fs::write(&fake, "#!/bin/sh\necho 'stand-in must not run'; exit 99\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let report = dir.join("report.txt");
    let out = Command::new("bash")
        .arg(dir.join("gpu-check.sh"))
        .arg("run")
        .env("GPU_CHECK_REPORT", &report)
        // Only the system folders: no nvidia-smi from anywhere else.
        .env("PATH", "/usr/bin:/bin")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("this machine has a GPU; the no-GPU path is not what runs here:\n{text}");
        return;
    }
    assert_eq!(out.status.code(), Some(3), "exit status: {text}");
    assert!(text.contains("NO GPU"), "{text}");
    assert!(!text.contains("stand-in must not run"), "{text}");
    let written = std::fs::read_to_string(&report).unwrap();
    assert!(
        written.contains("NO GPU") && written.contains("commit: test stand-in"),
        "{written}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
