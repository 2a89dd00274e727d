//! Splitting one framed CSV record (SPEC section 4, format 3) into cells, and reading the header
//! row's column names. Framing (where a record ends) is `input::lines`; both use one quote
//! machine, `CsvScan`, so they never disagree about what is quoted.

use super::lines::CsvScan;

/// The cells of one record, unquoted (`"a ""b"""` is `a "b"`). `record` has no terminating
/// newline; a trailing `\r` (CRLF files) is removed by the caller.
pub(crate) fn split_record(record: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cell: Vec<u8> = Vec::new();
    let mut scan = CsvScan::StartOfField;
    for &b in record.as_bytes() {
        let next = scan.step(b);
        let keep = match (scan, next) {
            (CsvScan::Quoted, CsvScan::Quoted) => true,
            // Opening, closing, and the first half of an escaped `""` are syntax.
            (_, CsvScan::Quoted | CsvScan::QuoteInQuoted) => scan == CsvScan::QuoteInQuoted,
            (_, CsvScan::StartOfField) => {
                cells.push(into_text(std::mem::take(&mut cell)));
                false
            }
            (_, CsvScan::Unquoted) => true,
        };
        if keep {
            cell.push(b);
        }
        scan = next;
    }
    cells.push(into_text(cell));
    cells
}

/// Cells are cut only at ASCII `,` and `"`, so each is still valid UTF-8; the lossy fallback
/// exists only so no input can panic here.
fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Column names as the engagement parser matches them: trimmed and lowercased, because the
/// header is written by people and spreadsheets (`Event`, ` user_id`).
pub(crate) fn header_names(record: &str) -> Vec<String> {
    split_record(record)
        .into_iter()
        .map(|name| name.trim().to_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_unquoted_and_empty_cells_kept_in_place() {
        assert_eq!(split_record("a,,b"), ["a", "", "b"]);
        assert_eq!(
            split_record("\"a,b\",\"x\"\"y\"\"\",c"),
            ["a,b", "x\"y\"", "c"]
        );
        assert_eq!(split_record("\"multi\nline\",z"), ["multi\nline", "z"]);
        assert_eq!(split_record("d\"e,\"\""), ["d\"e", ""]);
        assert_eq!(split_record("\"ab\"c,"), ["abc", ""]);
        assert_eq!(split_record(""), [""]);
        assert_eq!(split_record("é,ü"), ["é", "ü"]);
    }

    #[test]
    fn header_names_are_trimmed_and_lowercased() {
        assert_eq!(header_names(" Event ,User_ID"), ["event", "user_id"]);
    }
}
