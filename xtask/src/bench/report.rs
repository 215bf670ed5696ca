//! Results of the benchmarks: rows of repeated measurements per variant,
//! summarised as min/median/max, printed as a table, JSON, or BENCHMARKS.md.
use anyhow::Result;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

/// One measured quantity for several variants (e.g. direct, shepherd, haproxy).
#[derive(Debug, Clone)]
pub struct Row {
    /// What is measured, e.g. "bulk throughput, 1 connection".
    pub name: String,
    /// Unit of the samples, e.g. "MiB/s", "µs", "ms", "conn/s".
    pub unit: String,
    /// Whether bigger is better (for the ratio's reading).
    pub higher_is_better: bool,
    /// (variant, samples) in display order; the first is the baseline the
    /// others are compared with.
    pub variants: Vec<(String, Vec<f64>)>,
}

impl Row {
    pub fn new(name: &str, unit: &str, higher_is_better: bool) -> Row {
        Row {
            name: name.into(),
            unit: unit.into(),
            higher_is_better,
            variants: Vec::new(),
        }
    }

    pub fn push(&mut self, variant: &str, sample: f64) {
        match self.variants.iter_mut().find(|(v, _)| v == variant) {
            Some((_, s)) => s.push(sample),
            None => self.variants.push((variant.into(), vec![sample])),
        }
    }
}

/// A section of the report: rows plus free-text notes (targets, what won).
#[derive(Debug, Clone, Default)]
pub struct Section {
    pub title: String,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

/// (min, median, max) of samples; NaN-free input expected.
pub fn summary(samples: &[f64]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (v[0], mid, v[v.len() - 1])
}

/// Percentile (0..=100) of samples by nearest rank.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * samples.len() as f64).ceil().max(1.0) as usize;
    samples[rank.min(samples.len()) - 1]
}

pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub cpu: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_string();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            cpu,
            memory_gib: mem_kib / (1024.0 * 1024.0),
        }
    }
}

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn table_lines(section: &Section) -> Vec<Vec<String>> {
    let mut lines = Vec::new();
    for row in &section.rows {
        let base = row.variants.first().map(|(_, s)| summary(s).1);
        for (variant, samples) in &row.variants {
            let (min, med, max) = summary(samples);
            let ratio = match base {
                Some(b) if b != 0.0 && b.is_finite() && row.variants.len() > 1 => {
                    format!("{:.2}x", med / b)
                }
                _ => "-".into(),
            };
            lines.push(vec![
                row.name.clone(),
                variant.clone(),
                fmt(min),
                fmt(med),
                fmt(max),
                row.unit.clone(),
                ratio,
                samples.len().to_string(),
            ]);
        }
    }
    lines
}

const HEADER: [&str; 8] = [
    "measure", "variant", "min", "median", "max", "unit", "vs first", "n",
];

pub fn to_text(m: &Machine, sections: &[Section]) -> String {
    let mut out = format!(
        "machine: {} cores, {}, kernel {}\n",
        m.cores, m.cpu, m.kernel
    );
    for s in sections {
        let _ = writeln!(out, "\n== {} ==", s.title);
        let lines = table_lines(s);
        let mut widths: Vec<usize> = HEADER.iter().map(|h| h.len()).collect();
        for l in &lines {
            for (w, c) in widths.iter_mut().zip(l) {
                *w = (*w).max(c.chars().count());
            }
        }
        let render = |cells: Vec<String>| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let _ = writeln!(
            out,
            "{}",
            render(HEADER.iter().map(|h| h.to_string()).collect())
        );
        for l in lines {
            let _ = writeln!(out, "{}", render(l));
        }
        for n in &s.notes {
            let _ = writeln!(out, "  note: {n}");
        }
    }
    out
}

pub fn to_json(m: &Machine, sections: &[Section], quick: bool) -> Value {
    json!({
        "machine": {"cores": m.cores, "cpu": m.cpu, "kernel": m.kernel, "memory_gib": m.memory_gib},
        "quick": quick,
        "sections": sections.iter().map(|s| json!({
            "title": s.title,
            "notes": s.notes,
            "rows": s.rows.iter().map(|r| json!({
                "measure": r.name,
                "unit": r.unit,
                "higher_is_better": r.higher_is_better,
                "variants": r.variants.iter().map(|(v, samples)| {
                    let (min, med, max) = summary(samples);
                    json!({"variant": v, "samples": samples, "min": min, "median": med, "max": max})
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// A section's stable name: its title up to the first " (" or ":", so a
/// section keeps its place in BENCHMARKS.md when its title's details change.
fn section_key(title: &str) -> &str {
    let end = [title.find(" ("), title.find(':')]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(title.len());
    &title[..end]
}

/// The `## ` sections of an earlier BENCHMARKS.md (up to the analysis), by
/// key, each with its whole text.
fn old_sections(old: &str) -> Vec<(String, String)> {
    let body = old.split("<!-- analysis -->").next().unwrap_or("");
    let mut out: Vec<(String, String)> = Vec::new();
    for chunk in body.split("\n## ").skip(1) {
        let title = chunk.lines().next().unwrap_or("");
        out.push((
            section_key(title).to_string(),
            format!("## {}\n", chunk.trim_end()),
        ));
    }
    out
}

/// Writes BENCHMARKS.md: these sections, in place of the earlier run's
/// sections of the same name; the earlier run's other sections (a run with
/// `--only` measured just some) and the hand-written analysis stay.
pub fn write_markdown(path: &Path, m: &Machine, sections: &[Section], quick: bool) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        out,
        "Produced by `cargo xtask bench{}` on {} cores ({}), {:.0} GiB, kernel {}. Every figure was measured in the same run as its baseline; min/median/max over the repetitions (`n`), and the median's ratio to the first variant of its row.\n",
        if quick { " --quick" } else { "" },
        m.cores,
        m.cpu,
        m.memory_gib,
        m.kernel
    );
    let mut kept = old_sections(&old);
    let mut fresh: Vec<(String, String)> = Vec::new();
    for s in sections {
        let mut out = String::new();
        let _ = writeln!(out, "## {}\n", s.title);
        let _ = writeln!(out, "| {} |", HEADER.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(HEADER.len()));
        for l in table_lines(s) {
            let _ = writeln!(out, "| {} |", l.join(" | "));
        }
        out.push('\n');
        for n in &s.notes {
            let _ = writeln!(out, "- {n}");
        }
        fresh.push((section_key(&s.title).to_string(), out));
    }
    // Fresh sections take their old ones' places; new ones go last.
    for (key, text) in fresh {
        match kept.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = text,
            None => kept.push((key, text)),
        }
    }
    if !sections.is_empty() && kept.len() > sections.len() {
        let measured: Vec<&str> = sections.iter().map(|s| section_key(&s.title)).collect();
        let _ = writeln!(
            out,
            "This run measured only: {}. The other sections are kept from an earlier run.\n",
            measured.join(", ")
        );
    }
    for (_, text) in kept {
        out.push_str(text.trim_end());
        out.push_str("\n\n");
    }
    // Keep the hand-written analysis below the generated tables.
    if let Some(i) = old.find("<!-- analysis -->") {
        out.push_str(&old[i..]);
    }
    std::fs::write(path, out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_run_replaces_only_its_sections() {
        let old = "# Benchmarks\n\nheader\n\n## Migration pause (old)\n\n| a |\n\n## Scale: x\n\n| s |\n\n<!-- analysis -->\nkept\n";
        let secs = old_sections(old);
        assert_eq!(secs.len(), 2);
        assert_eq!(secs[0].0, "Migration pause");
        assert_eq!(secs[1].0, "Scale");
        assert!(secs[1].1.contains("| s |"));
        assert_eq!(
            section_key("Hold under pressure: one client"),
            "Hold under pressure"
        );
    }

    #[test]
    fn summaries() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), (1.0, 2.5, 4.0));
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), 50.0);
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut v, 100.0), 100.0);
    }
}
