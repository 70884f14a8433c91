//! The resident size of one memory mapping of this process, from `/proc/self/smaps` (Linux): shared by the
//! tests that check a model file's mapped pages are released once read.

#![allow(dead_code)]

/// Resident bytes of the mapping that holds address `at`.
pub fn mapping_rss(at: usize) -> usize {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = (a..b).contains(&at);
                continue;
            }
        }
        if inside {
            if let Some(kb) = line.strip_prefix("Rss:") {
                return kb.trim().trim_end_matches("kB").trim().parse::<usize>().unwrap() * 1024;
            }
        }
    }
    panic!("no mapping holds {at:#x}");
}
