//! The previous run's figure next to each new one: the Summary table of the BENCHMARKS.md a
//! run replaces gets a "previous run" column, so a change's effect reads off one table.

use std::collections::HashMap;

/// A summary row's key: its figure with the digits left out (a row keeps its key when the
/// run's sizes change, e.g. "(lab, 64 verdicts)"), and for a "..." row the row it continues.
fn key(figure: &str, parent: &str) -> String {
    let own: String = figure.chars().filter(|c| !c.is_ascii_digit()).collect();
    if figure.starts_with("...") {
        format!("{parent} {own}")
    } else {
        own
    }
}

/// The cells of a markdown table row, trimmed; `None` for a line that is not a row.
fn cells(line: &str) -> Option<Vec<&str>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(str::trim).collect())
}

/// The Summary table's rows of a BENCHMARKS.md: key -> measured.
fn summary_rows(md: &str) -> HashMap<String, String> {
    let mut rows = HashMap::new();
    let mut parent = String::new();
    let Some(start) = md.find("## Summary") else {
        return rows;
    };
    for line in md[start..].lines().skip(1) {
        if line.starts_with("## ") || line.starts_with("### ") {
            break;
        }
        let Some(c) = cells(line) else { continue };
        if c.len() < 4 || c[0] == "figure" || c[0].starts_with("---") {
            continue;
        }
        let k = key(c[0], &parent);
        if !c[0].starts_with("...") {
            parent = k.clone();
        }
        rows.insert(k, c[1].to_string());
    }
    rows
}

/// "machine, date, commit" of a BENCHMARKS.md, from its `- machine:` and `- date:` lines:
/// figures from another machine are not comparable one for one, and the header says so.
fn run_label(md: &str) -> Option<String> {
    let line = md.lines().find_map(|l| l.strip_prefix("- date: "))?;
    let when = line.split(", mode").next().unwrap_or(line);
    let machine = md
        .lines()
        .find_map(|l| l.strip_prefix("- machine: "))
        .map(|m| m.split(" (").next().unwrap_or(m));
    Some(match machine {
        Some(m) => format!("{m}, {when}"),
        None => when.to_string(),
    })
}

/// `new` with a "previous run" column in its Summary table, from `old` (the file it replaces).
pub fn with_previous(new: &str, old: Option<&str>) -> String {
    let Some(old) = old else {
        return new.to_string();
    };
    let before = summary_rows(old);
    if before.is_empty() {
        return new.to_string();
    }
    let label = run_label(old).unwrap_or_else(|| "unknown".into());
    let mut out = String::with_capacity(new.len() + 4096);
    let mut in_summary = false;
    let mut parent = String::new();
    for line in new.lines() {
        if line.starts_with("## ") {
            in_summary = line.starts_with("## Summary");
        }
        let row = if in_summary { cells(line) } else { None };
        match row {
            Some(c) if c.len() == 4 && c[0] == "figure" => {
                out.push_str(&format!(
                    "| figure | measured | previous run ({label}) | target | result |"
                ));
            }
            Some(c) if c.len() == 4 && c[0].starts_with("---") => {
                out.push_str("|---|---|---|---|---|");
            }
            Some(c) if c.len() == 4 => {
                let k = key(c[0], &parent);
                if !c[0].starts_with("...") {
                    parent = k.clone();
                }
                let prev = before.get(&k).map_or("-", String::as_str);
                out.push_str(&format!(
                    "| {} | {} | {prev} | {} | {} |",
                    c[0], c[1], c[2], c[3]
                ));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "# Benchmarks\n\n- machine: AMD EPYC (2 cores, 23.5 GiB), kernel 6.18.44\n- date: 2026-11-26 11:51 UTC, commit 436dfe3, mode `full`, wall time 358 s\n\n## Summary\n\n| figure | measured | target | result |\n|---|---|---|---|\n| TCP cost with detector | 20.0% | <= 3% | missed |\n| ... as CPU time per operation | 3.01 us | - | - |\n| UDP cost with detector | 49.0% | <= 3% | missed |\n| ... as CPU time per operation | 3.24 us | - | - |\n| verdict latency (lab, 256 verdicts) | p99 10.57 ms | p99 <= 5 ms | missed |\n\n### Notes\n\n| not | a | summary | row |\n";

    #[test]
    fn each_row_gets_the_previous_runs_figure() {
        let new = "## Summary\n\n| figure | measured | target | result |\n|---|---|---|---|\n| TCP cost with detector | 9.0% | <= 3% | missed |\n| ... as CPU time per operation | 1.50 us | - | - |\n| UDP cost with detector | 40.0% | <= 3% | missed |\n| ... as CPU time per operation | 2.00 us | - | - |\n| verdict latency (lab, 64 verdicts) | p99 4.00 ms | p99 <= 5 ms | met |\n| a new figure | 1 | - | - |\n\n## 1. Overhead\n\n| figure | measured | target | result |\n";
        let out = with_previous(new, Some(OLD));
        assert!(out.contains(
            "| figure | measured | previous run (AMD EPYC, 2026-11-26 11:51 UTC, commit 436dfe3) | target | result |"
        ));
        assert!(out.contains("| TCP cost with detector | 9.0% | 20.0% | <= 3% | missed |"));
        // The "..." rows follow the row they continue.
        assert!(out.contains("| ... as CPU time per operation | 1.50 us | 3.01 us | - | - |"));
        assert!(out.contains("| ... as CPU time per operation | 2.00 us | 3.24 us | - | - |"));
        assert!(
            out.contains("| verdict latency (lab, 64 verdicts) | p99 4.00 ms | p99 10.57 ms |")
        );
        assert!(out.contains("| a new figure | 1 | - | - | - |"));
        // Tables outside the Summary are left alone.
        assert!(out.ends_with("| figure | measured | target | result |\n"));
    }

    #[test]
    fn no_previous_file_leaves_the_table_alone() {
        let new = "## Summary\n\n| figure | measured | target | result |\n";
        assert_eq!(with_previous(new, None), new);
    }
}
