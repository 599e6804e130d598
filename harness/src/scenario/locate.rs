//! Where in the file a value was written: byte spans to line, column and
//! the dotted field name an error shows.

use std::ops::Range;
use std::path::Path;

use super::ScenarioError;

/// Maps byte offsets to 1-based line and column and names the field there.
pub(super) struct Locator<'a> {
    pub file: &'a Path,
    pub source: &'a str,
}

impl Locator<'_> {
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.source[..offset.min(self.source.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        (line, column)
    }

    /// The dotted path of the key on the line of `offset`, within the table
    /// header above it (`[machine]`, or the n-th `[[step]]`).
    fn field_at(&self, offset: usize) -> String {
        let offset = offset.min(self.source.len());
        let line_start = self.source[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line_end = self.source[offset..].find('\n').map(|i| offset + i).unwrap_or(self.source.len());
        let line = self.source[line_start..line_end].trim();
        let header = |l: &str| -> Option<String> {
            let l = l.trim();
            let inner = l
                .strip_prefix("[[")
                .and_then(|r| r.split("]]").next())
                .or_else(|| l.strip_prefix('[').and_then(|r| r.split(']').next()))?;
            Some(inner.trim().to_string())
        };
        if let Some(h) = header(line).filter(|_| line.starts_with('[')) {
            return h;
        }
        let key = line.split('=').next().unwrap_or("").trim().trim_matches('"').to_string();
        // Find the table this line belongs to, counting array-of-table entries.
        let mut table = String::new();
        let mut index = None;
        for l in self.source[..line_start].lines() {
            let t = l.trim();
            if t.starts_with("[[") {
                let name = header(t).unwrap_or_default();
                index = if name == table { index.map(|i: usize| i + 1) } else { Some(1) };
                table = name;
            } else if t.starts_with('[') {
                table = header(t).unwrap_or_default();
                index = None;
            }
        }
        match (table.is_empty(), index, key.is_empty()) {
            (true, _, _) => key,
            (false, Some(i), true) => format!("{table}[{i}]"),
            (false, Some(i), false) => format!("{table}[{i}].{key}"),
            (false, None, true) => table,
            (false, None, false) => format!("{table}.{key}"),
        }
    }

    pub fn error(&self, span: Range<usize>, field: Option<&str>, message: impl Into<String>) -> ScenarioError {
        let (line, column) = self.line_col(span.start);
        ScenarioError {
            file: self.file.to_path_buf(),
            line,
            column,
            field: field.map(str::to_string).unwrap_or_else(|| self.field_at(span.start)),
            message: message.into(),
        }
    }

    /// An error about a step's `field`, at the start of the step's line:
    /// for checks that weigh several steps against each other.
    pub fn at_line(&self, line: usize, field: &str, message: impl Into<String>) -> ScenarioError {
        ScenarioError {
            file: self.file.to_path_buf(),
            line,
            column: 1,
            field: field.to_string(),
            message: message.into(),
        }
    }
}
