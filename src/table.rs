//! The command line's tables (`kiln jobs`, `kiln cluster`, `kiln models`): each column as wide
//! as its widest cell, so a long model or node name does not push the rest out of line, as
//! fixed widths did.

/// Which side of its column a cell keeps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table with a header row; [`Table::render`] lays it out.
#[derive(Debug, Clone)]
pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&str, Align)]) -> Table {
        Table { columns: columns.iter().map(|(name, align)| (name.to_string(), *align)).collect(), rows: vec![] }
    }

    /// Adds a row; missing cells are empty, extra ones are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.columns.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as lines of text, two spaces between columns, no trailing spaces. Widths count
    /// characters, not bytes.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| self.rows.iter().map(|r| width(&r[i])).chain([width(&self.columns[i].0)]).max().unwrap_or(0))
            .collect();
        let line = |cells: Vec<&str>| {
            let laid: Vec<String> = cells
                .iter()
                .zip(&self.columns)
                .zip(&widths)
                .map(|((cell, (_, align)), w)| match align {
                    Align::Left => format!("{cell:<w$}"),
                    Align::Right => format!("{cell:>w$}"),
                })
                .collect();
            laid.join("  ").trim_end().to_string()
        };
        let mut out = vec![line(self.columns.iter().map(|(name, _)| name.as_str()).collect())];
        out.extend(self.rows.iter().map(|r| line(r.iter().map(String::as_str).collect())));
        out.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_column_is_as_wide_as_its_widest_cell() {
        let mut t = Table::new(&[("MODEL", Align::Left), ("N", Align::Right), ("NODES", Align::Left)]);
        t.row(vec!["a-model-name-longer-than-any-fixed-width-column".into(), "3".into(), "n1".into()]);
        t.row(vec!["x".into(), "12".into(), "n1,n2".into()]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        // The third column starts at the same character in every line.
        let starts: Vec<usize> = lines.iter().map(|l| l.rfind("  ").unwrap() + 2).collect();
        assert!(starts.windows(2).all(|w| w[0] == w[1]), "{text}");
        // The first column is as wide as the 47-character name.
        assert_eq!(lines[2], format!("x{}  12  n1,n2", " ".repeat(46)));
        assert!(lines.iter().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn widths_count_characters() {
        let mut t = Table::new(&[("A", Align::Left), ("B", Align::Left)]);
        t.row(vec!["héé".into(), "x".into()]);
        t.row(vec!["abc".into(), "y".into()]);
        let text = t.render();
        assert_eq!(text.lines().nth(1), Some("héé  x"));
        assert_eq!(text.lines().nth(2), Some("abc  y"));
    }
}
