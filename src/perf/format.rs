//! The text nccl-tests prints, reproduced from its printf formats (`src/util.cu`: `writeDeviceReport`,
//! `writeResultHeader`, `writeBenchmarkLinePreamble`, `writeBenchmarkLineBody`, `writeResultFooter`).
//!
//! Rust's formatting differs from C's `%e` and `%g`, so those two are emulated here ([`c_exp`], [`c_g`]).

/// C's `%.{prec}e`: mantissa, `e`, sign and at least two exponent digits (`1.5e+07`).
pub fn c_exp(value: f64, prec: usize) -> String {
    if !value.is_finite() {
        return c_non_finite(value);
    }
    let s = format!("{value:.prec$e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exp.abs())
}

fn c_non_finite(value: f64) -> String {
    if value.is_nan() {
        "nan".into()
    } else if value > 0.0 {
        "inf".into()
    } else {
        "-inf".into()
    }
}

/// C's `%g` (precision 6): the shorter of fixed and exponent notation, trailing zeros removed.
pub fn c_g(value: f64) -> String {
    if !value.is_finite() {
        return c_non_finite(value);
    }
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    const P: i32 = 6;
    // The decimal exponent after rounding to P significant digits decides the notation.
    let rounded = format!("{value:.*e}", (P - 1) as usize);
    let x: i32 = rounded.split_once('e').and_then(|(_, e)| e.parse().ok()).unwrap_or(0);
    if (-4..P).contains(&x) {
        let decimals = (P - 1 - x) as usize;
        strip_zeros(&format!("{value:.decimals$}"))
    } else {
        let s = c_exp(value, (P - 1) as usize);
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, ""));
        format!("{}e{exp}", strip_zeros(mantissa))
    }
}

fn strip_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// nccl-tests' `getFloatStr`: `%*.2f`, else `%*.1f`, else `%*.0f` if it fits in `width`, else `%*.1e` (width
/// ≥ 7) or `%*.0e`, cut to `width` characters as `snprintf` into a `width + 1` buffer does.
pub fn float_str(value: f64, width: usize) -> String {
    for decimals in [2usize, 1, 0] {
        let s = format!("{value:>width$.decimals$}");
        if s.len() <= width {
            return s;
        }
    }
    let s = format!("{:>width$}", c_exp(value, if width >= 7 { 1 } else { 0 }));
    s.chars().take(width).collect()
}

/// The preamble of a result row: `%12li  %12li  %8s  %6s  %6s` (size, count, type, redop, root).
pub fn row_preamble(size: usize, count: usize, type_name: &str, op_name: &str, root: i64) -> String {
    let root = format!("{root:>6}");
    format!("{size:>12}  {count:>12}  {type_name:>8}  {op_name:>6}  {root:>6}")
}

/// One measured column group: `  %7s  %6s  %6s  %6g` (time µs, algbw, busbw, #wrong), or `    N/A` in place
/// of `#wrong` when the check is off.
pub fn row_body(time_us: f64, algbw: f64, busbw: f64, wrong: Option<u64>) -> String {
    let (t, a, b) = (float_str(time_us, 7), float_str(algbw, 6), float_str(busbw, 6));
    match wrong {
        Some(w) => format!("  {t:>7}  {a:>6}  {b:>6}  {:>6}", c_g(w as f64)),
        None => format!("  {t:>7}  {a:>6}  {b:>6}    N/A"),
    }
}

/// The column group of a measurement that was not taken (in place, for operations without an in-place form).
pub fn row_body_not_applicable() -> String {
    format!("  {:>7}  {:>6}  {:>6}  {:>6}", "N/A", "N/A", "N/A", "N/A")
}

/// The table header (four lines, each ending in `\n`); `cputime` renames the time columns as `-C 1` does.
pub fn result_header(cputime: bool) -> String {
    let time = if cputime { "cputime" } else { "time" };
    let mut s = String::from("#\n");
    s += &format!(
        "# {:>10}  {:>12}  {:>8}  {:>6}  {:>6}           out-of-place                       in-place          \n",
        "", "", "", "", ""
    );
    s += &format!(
        "# {:>10}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>6} \n",
        "size", "count", "type", "redop", "root", time, "algbw", "busbw", "#wrong", time, "algbw", "busbw", "#wrong"
    );
    s += &format!(
        "# {:>10}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>6} \n",
        "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", ""
    );
    s
}

/// The parameter line of `writeDeviceReport`.
#[allow(clippy::too_many_arguments)]
pub fn config_line(
    nthreads: usize,
    ngpus: usize,
    min_bytes: usize,
    max_bytes: usize,
    step_factor: usize,
    step_bytes: usize,
    warmup: usize,
    iters: usize,
    agg: usize,
    check: usize,
    graph: usize,
) -> String {
    let (step, kind) = if step_factor > 1 {
        (step_factor, "factor")
    } else {
        (step_bytes, "bytes")
    };
    format!(
        "# nThread {nthreads} nGpus {ngpus} minBytes {min_bytes} maxBytes {max_bytes} step: {step}({kind}) warmup \
         iters: {warmup} iters: {iters} agg iters: {agg} validation: {check} graph: {graph} unalign: 0\n"
    )
}

/// The `-z` line nccl-tests prints for blocking modes 1 to 3 (empty for 0).
pub fn blocking_line(mode: u32) -> &'static str {
    match mode {
        1 => "# Blocking Enabled: wait and barrier after each inner iteration (-m) \n",
        2 => "# Blocking Enabled: wait after each inner iteration (-m), no barrier \n",
        3 => "# Blocking Enabled: wait and barrier after each outer iteration (-n); time excludes barrier \n",
        _ => "",
    }
}

/// One `# Using devices` line: `#  Rank %2d Group %2d Pid %6d on %10s device %2d [%04x:%02x:%02x] %s`.
pub fn device_line(rank: usize, pid: u32, host: &str, device: usize, pci: (u32, u32, u32), name: &str) -> String {
    format!(
        "#  Rank {rank:>2} Group {:>2} Pid {pid:>6} on {host:>10} device {device:>2} [{:04x}:{:02x}:{:02x}] {name}\n",
        0, pci.0, pci.1, pci.2
    )
}

/// The footer: out-of-bounds count with OK/FAILED, the average bus bandwidth (`%g`), and the closing lines.
pub fn footer(wrong_total: u64, avg_busbw: f64, program: &str) -> String {
    let status = if wrong_total > 0 { "FAILED" } else { "OK" };
    let mut s = format!("# {:<20} : {wrong_total} {status}\n", "Out of bounds values");
    s += &format!("# {:<20} : {} \n", "Avg bus bandwidth", c_g(avg_busbw));
    s += "#\n";
    s += &format!("# Collective test concluded: {program}\n");
    s += "#\n\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_formats() {
        assert_eq!(c_exp(12345678.0, 1), "1.2e+07");
        assert_eq!(c_exp(0.000123, 0), "1e-04");
        assert_eq!(c_g(0.0), "0");
        assert_eq!(c_g(7.0), "7");
        assert_eq!(c_g(123456.0), "123456");
        assert_eq!(c_g(1234567.0), "1.23457e+06");
        assert_eq!(c_g(0.5), "0.5");
        assert_eq!(c_g(1.0 / 3.0), "0.333333");
        assert_eq!(c_g(0.0001), "0.0001");
        assert_eq!(c_g(0.00001), "1e-05");
        assert_eq!(c_g(12.25), "12.25");
    }

    #[test]
    fn float_str_falls_back_like_get_float_str() {
        assert_eq!(float_str(2.34567, 7), "   2.35");
        assert_eq!(float_str(12345.678, 7), "12345.7");
        assert_eq!(float_str(1234567.4, 7), "1234567");
        assert_eq!(float_str(12345678.0, 7), "1.2e+07");
        assert_eq!(float_str(123.456, 6), "123.46");
        assert_eq!(float_str(1234.56, 6), "1234.6");
        assert_eq!(float_str(123456.7, 6), "123457");
        assert_eq!(float_str(1234567.0, 6), " 1e+06");
    }
}
