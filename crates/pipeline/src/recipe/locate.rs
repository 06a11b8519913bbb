//! Finds the line of a dotted key path in recipe text, so errors found after parsing can still
//! point at the YAML line the user has to change.

/// The 1-based line where the last key of `path` appears, searching each key after the line
/// of the previous one (works for block and flow mappings alike).
pub fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0usize;
    let mut found = None;
    for key in path {
        let (line, _) = lines
            .iter()
            .enumerate()
            .skip(start)
            .find(|(_, l)| has_key(l, key))?;
        start = line;
        found = Some(line + 1);
    }
    found
}

fn has_key(line: &str, key: &str) -> bool {
    let code = line.split(" #").next().unwrap_or(line);
    let mut rest = code;
    while let Some(pos) = rest.find(key) {
        let before = rest[..pos].chars().last();
        let after = &rest[pos + key.len()..];
        let boundary = matches!(before, None | Some(' ' | '{' | ',' | '-' | '"' | '\''));
        let after = after.trim_start_matches(['"', '\'']);
        if boundary && after.trim_start().starts_with(':') {
            return true;
        }
        rest = &rest[pos + key.len()..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::line_of;

    #[test]
    fn finds_nested_keys_in_block_and_flow_style() {
        let text = "version: 1\nmodels:\n  base: {kind: sd15, source: x}\nnodes:\n  gen:\n    generate:\n      size: [500, 512]\n      steps: 4\n";
        assert_eq!(
            line_of(text, &["nodes", "gen", "generate", "size"]),
            Some(7)
        );
        assert_eq!(line_of(text, &["models", "base", "source"]), Some(3));
        assert_eq!(line_of(text, &["nodes", "gen", "generate", "seed"]), None);
    }
}
