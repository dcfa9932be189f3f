//! kubectl-style tables: column widths that hold across a watch, and ages.

use jiff::SignedDuration;

/// Column widths of a kubectl-style table, kept across lines so that the rows a watch prints
/// later line up under the table printed first (a wider cell widens its column from then on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Columns {
    widths: Vec<usize>,
}

impl Columns {
    /// Widths that fit the headers and every row.
    pub fn fit(headers: &[&str], rows: &[Vec<String>]) -> Self {
        let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        Columns { widths }
    }

    /// One line: left-aligned cells separated by three spaces, without trailing blanks.
    pub fn line<S: AsRef<str>>(&mut self, cells: &[S]) -> String {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let cell = cell.as_ref();
            let n = cell.chars().count();
            if i >= self.widths.len() {
                self.widths.push(n);
            }
            self.widths[i] = self.widths[i].max(n);
            out.push_str(cell);
            if i < last {
                out.extend(std::iter::repeat_n(' ', self.widths[i] - n + 3));
            }
        }
        out.trim_end().to_string()
    }
}

/// Renders rows under headers as kubectl does: left-aligned columns separated by three spaces.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut cols = Columns::fit(headers, rows);
    let mut out = cols.line(headers);
    out.push('\n');
    for row in rows {
        out.push_str(&cols.line(row));
        out.push('\n');
    }
    out
}

/// A duration the way kubectl prints ages: `45s`, `3m20s`, `45m`, `5h30m`, `20h`, `3d5h`, `30d`.
pub fn human_duration(d: SignedDuration) -> String {
    let secs = d.as_secs().max(0);
    let (m, h, day) = (60, 3600, 86400);
    match secs {
        s if s < 2 * m => format!("{s}s"),
        s if s < 10 * m => format_pair(s / m, "m", s % m, "s"),
        s if s < 3 * h => format!("{}m", s / m),
        s if s < 8 * h => format_pair(s / h, "h", (s % h) / m, "m"),
        s if s < 2 * day => format!("{}h", s / h),
        s if s < 8 * day => format_pair(s / day, "d", (s % day) / h, "h"),
        s if s < 365 * 2 * day => format!("{}d", s / day),
        s => format!("{}y", s / (365 * day)),
    }
}

fn format_pair(a: i64, ua: &str, b: i64, ub: &str) -> String {
    if b == 0 {
        format!("{a}{ua}")
    } else {
        format!("{a}{ua}{b}{ub}")
    }
}
