//! Static bearer tokens: kube-apiserver's `--token-auth-file`, a CSV file with one
//! `token,user,uid[,"group1,group2"]` line per token.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::{AUTHENTICATED, UserInfo};

/// The tokens of a token file, by token.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_token: HashMap<String, Arc<UserInfo>>,
}

impl Tokens {
    /// Reads `path`; an error names the file and the line.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the token file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("the token file {}: {e}", path.display()))
    }

    /// Parses the file's text. Blank lines and lines starting with `#` are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut by_token = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields = split_csv(line).map_err(|e| format!("line {n}: {e}"))?;
            if fields.len() < 3 {
                return Err(format!(
                    "line {n}: want token,user,uid[,\"group1,group2\"], got {} field(s)",
                    fields.len()
                ));
            }
            if fields.len() > 4 {
                return Err(format!(
                    "line {n}: want at most 4 fields (quote the groups: \"group1,group2\"), got {}",
                    fields.len()
                ));
            }
            let (token, name, uid) = (&fields[0], &fields[1], &fields[2]);
            if token.is_empty() {
                return Err(format!("line {n}: the token is empty"));
            }
            if name.is_empty() {
                return Err(format!("line {n}: the user name is empty"));
            }
            let mut groups: Vec<String> = fields
                .get(3)
                .map(|g| {
                    g.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            groups.push(AUTHENTICATED.to_string());
            let user = UserInfo {
                name: name.clone(),
                uid: uid.clone(),
                groups,
            };
            if by_token.insert(token.clone(), Arc::new(user)).is_some() {
                return Err(format!("line {n}: the token is already on an earlier line"));
            }
        }
        Ok(Tokens { by_token })
    }

    pub fn get(&self, token: &str) -> Option<&Arc<UserInfo>> {
        self.by_token.get(token)
    }

    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }
}

/// Splits one CSV record: fields separated by commas, a field in double quotes may hold
/// commas, `""` inside quotes is one quote; spaces before a field are dropped (Go's
/// `TrimLeadingSpace`, which kube-apiserver sets).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
            chars.next();
        }
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("a quoted field is not closed".into()),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => fields.push(field),
                Some(c) => return Err(format!("{c:?} after a closing quote")),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(',') => break,
                    Some('"') => return Err("a quote inside an unquoted field".into()),
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kube_apiserver_lines() {
        let t = Tokens::parse(
            "# tokens\n\
             s3cret,alice,1001,\"dev,ops\"\n\
             \n\
             t2, bob , 1002\n\
             t3,carol,1003,\"a \"\"quoted\"\" group\"\n",
        )
        .unwrap();
        assert_eq!(t.len(), 3);
        let alice = t.get("s3cret").unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.uid, "1001");
        assert_eq!(alice.groups, ["dev", "ops", AUTHENTICATED]);
        assert_eq!(t.get("t2").unwrap().name, "bob ");
        assert_eq!(
            t.get("t3").unwrap().groups,
            ["a \"quoted\" group", AUTHENTICATED]
        );
        assert!(t.get("alice").is_none());
    }

    #[test]
    fn names_the_line_of_a_bad_record() {
        for (text, want) in [
            ("ok,a,1\nonly,two\n", "line 2: want token,user,uid"),
            ("a,b,c,d,e\n", "line 1: want at most 4 fields"),
            (",alice,1\n", "line 1: the token is empty"),
            ("t,,1\n", "line 1: the user name is empty"),
            ("t,a,1,\"g\n", "line 1: a quoted field is not closed"),
            (
                "t,a,1\nt,b,2\n",
                "line 2: the token is already on an earlier line",
            ),
            ("t,a\"b,1\n", "line 1: a quote inside an unquoted field"),
        ] {
            let err = Tokens::parse(text).unwrap_err();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
    }
}
