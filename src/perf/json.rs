//! `-J out.json`: the run's parameters and every row with every column.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::driver::{Measure, Row, Summary};

fn measure(m: Option<&Measure>, cputime: bool) -> Value {
    match m {
        None => Value::Null,
        Some(m) => {
            let time_key = if cputime { "cpu_time" } else { "time" };
            json!({
                time_key: m.time_us,
                "alg_bw": m.algbw,
                "bus_bw": m.busbw,
                "nwrong": m.wrong,
            })
        }
    }
}

/// One row as a JSON object: `size`, `count`, `type`, `redop`, `root`, and `out_of_place` / `in_place` objects
/// with `time` (or `cpu_time`) in µs, `alg_bw`, `bus_bw` in GB/s and `nwrong` (null when unchecked or not
/// measured), the keys nccl-tests uses.
pub fn row_json(row: &Row, cputime: bool) -> Value {
    json!({
        "size": row.size,
        "count": row.count,
        "type": row.dtype,
        "redop": row.redop,
        "root": row.root,
        "out_of_place": measure(Some(&row.out_of_place), cputime),
        "in_place": measure(row.in_place.as_ref(), cputime),
    })
}

/// What the JSON document records besides the rows.
#[derive(Clone, Debug)]
pub struct RunInfo {
    /// The command line, program name first.
    pub args: Vec<String>,
    /// `host` or `nccl`.
    pub backend: String,
    /// Crate version (host) or loaded libnccl version (nccl).
    pub library_version: String,
    /// nccl-tests' program name (`all_reduce_perf`).
    pub program: String,
    /// Total ranks.
    pub nranks: usize,
    /// The parameters as key/value pairs.
    pub config: Value,
    /// Whether `-C 1` was given.
    pub cputime: bool,
}

/// The whole document.
pub fn document(info: &RunInfo, summary: &Summary) -> Value {
    json!({
        "version": 1,
        "tool": "nccl-perf",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "program": info.program,
        "date": utc_now(),
        "args": info.args,
        "command_line": info.args.join(" "),
        "backend": info.backend,
        "library_version": info.library_version,
        "nranks": info.nranks,
        "config": info.config,
        "devices": summary.device_lines.iter().map(|l| l.trim_end()).collect::<Vec<_>>(),
        "results": summary.rows.iter().map(|r| row_json(r, info.cputime)).collect::<Vec<_>>(),
        "out_of_bounds": { "count": summary.wrong_total, "okay": summary.wrong_total == 0 },
        "average_bus_bandwidth": { "bandwidth": summary.avg_busbw },
    })
}

/// Writes the document to `path` (pretty-printed).
pub fn write(path: &Path, info: &RunInfo, summary: &Summary) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(&document(info, summary))?;
    std::fs::write(path, text + "\n")
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_string(secs)
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian calendar).
pub fn utc_string(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_string(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_string(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_string(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
