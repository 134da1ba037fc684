//! The module graph of `src/`, checked on the source text: no module reaches
//! itself through others, and every dependency points down [`LAYERS`].
//!
//! Issue 7 §1 asks for dependencies that run one way so each layer can be
//! read and tested alone; this keeps it so for anyone who runs `cargo test`.
//! It reads the files rather than asking the compiler, so it needs nothing but
//! std and says where each edge was written.
//!
//! What counts as a dependency of a file's module: every path that starts
//! with `crate::`, `super::`, `self::` or the name of a child module, in `use`
//! declarations (groups expanded) and in code; it depends on the deepest
//! module of `src/` that the path names (`crate::actors::Shared` is a use of
//! `actors`). A `mod x;` declaration is not one: a parent that only declares
//! its children does not use them. Comments, doc comments and string
//! literals are skipped.
//!
//! `#[cfg(test)] mod tests` blocks count like the rest: a unit test that
//! needs a module above its own means the module cannot be tested alone,
//! which is what the rule is for; and their `use super::*` names the module
//! itself, so ordinary tests add no edge.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use modules of its own layer and of
/// layers before it, never one after (within a layer the cycle check still
/// applies). A module takes the layer of the longest entry that is it or one
/// of its ancestors (`db` covers `db::queries`); `crate` (lib.rs, main.rs)
/// matches only itself. The issue fixes the order of the named ones:
/// protocol / ids / config, db, routing, actors (conn, drain, registry,
/// session), http, broker, cli. Where the others sit is said beside them.
const LAYERS: &[(&str, &[&str])] = &[
    // The vocabulary. `error_code` is every refusal's code, which the frames
    // carry; `crypto` is pure ed25519 and the signed strings, used by the
    // handshake checks and the client alike; `client_addr` is the address
    // blocks `config` names and the rule that reads `X-Forwarded-For`.
    (
        "base",
        &[
            "protocol",
            "ids",
            "config",
            "client_addr",
            "error_code",
            "crypto",
            "sd_notify",
            "tls",
            "reload",
        ],
    ),
    // The protocol's other end, behind `meshbroker client` and the tests:
    // whoever talks to a broker must not need the broker's own layers.
    ("client", &["client"]),
    ("db", &["db"]),
    // Counters and the `/metrics` text, with gauges read from the database at
    // scrape time. Above `db`: the database reports facts and does not know
    // it is being measured (issue 7 names `db::queries` -> `metrics` as an
    // upward edge); below everything that counts (actors, http).
    ("metrics", &["metrics"]),
    // Work on one database connection, without actors: the hello checks, and
    // the operator's mesh/member and dead-letter commands.
    (
        "db users",
        &["handshake", "admin", "dead_letters", "status"],
    ),
    // Pure routing decisions: the actors gather the facts and ask.
    ("routing", &["routing"]),
    // `actors` itself holds what every actor shares (`Shared`, the rate
    // limiter).
    ("actors", &["actors"]),
    // The batching actors (writer, claimer, acker) and the wake-up message
    // the writer sends after each commit: they know the database and the
    // routing rules, not the connections or drains they serve.
    (
        "actors::batch",
        &[
            "actors::wake",
            "actors::batch",
            "actors::claims",
            "actors::writer",
        ],
    ),
    // A connection's outward face: what drains and the registry may send to
    // a connection, the handle they send it through, and the backlog every
    // push goes through.
    ("actors::conn", &["actors::conn", "actors::backlog"]),
    ("actors::drain", &["actors::drain"]),
    ("actors::registry", &["actors::registry"]),
    // The actors that drive the registry: one per connection, and the two
    // supervised background passes.
    (
        "actors::session",
        &[
            "actors::session",
            "actors::sweeper",
            "actors::janitor",
            "actors::bus",
        ],
    ),
    ("http", &["http"]),
    ("broker", &["broker"]),
    // `meshbroker bench`: a load generator over the client that starts its
    // own broker (as a process, through the CLI) and provisions members.
    ("bench", &["bench"]),
    ("cli", &["cli"]),
    // lib.rs declares every module and main.rs calls the CLI.
    ("crate root", &["crate"]),
];

/// The package's own name, which main.rs uses as the library's root.
const PACKAGE: &str = env!("CARGO_PKG_NAME");

#[test]
fn no_module_cycles() {
    let graph = Graph::of_tree(&src_dir());
    let cycles = graph.cycles();
    assert!(
        cycles.is_empty(),
        "module cycles in src/ ({}):\n{}",
        cycles.len(),
        graph.describe_cycles(&cycles)
    );
}

#[test]
fn dependencies_follow_the_layers() {
    let graph = Graph::of_tree(&src_dir());
    let problems = graph.layer_problems(LAYERS);
    assert!(
        problems.is_empty(),
        "dependencies against the layer order in tests/module_graph.rs ({}):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// A module path; the crate root is the empty path.
type Module = Vec<String>;

fn display(m: &[String]) -> String {
    if m.is_empty() {
        "crate".to_owned()
    } else {
        m.join("::")
    }
}

/// `a/b.rs` and `a/b/mod.rs` are `a::b`; `lib.rs`, `main.rs` and `bin/*.rs`
/// are crate roots.
fn module_of(relative: &Path) -> Module {
    let parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let (last, dirs) = parts.split_last().expect("a file path");
    let stem = last.strip_suffix(".rs").unwrap_or(last);
    if dirs.is_empty() && (stem == "lib" || stem == "main")
        || dirs.first().is_some_and(|d| d == "bin")
    {
        return Vec::new();
    }
    let mut module = dirs.to_vec();
    if stem != "mod" {
        module.push(stem.to_owned());
    }
    module
}

/// Where an edge was written: the first place, enough to find it.
#[derive(Debug, Clone)]
struct Evidence {
    file: String,
    line: usize,
    path: String,
}

#[derive(Debug, Default)]
struct Graph {
    modules: BTreeSet<Module>,
    /// (from, to) -> where it was first seen.
    edges: BTreeMap<(String, String), Evidence>,
}

impl Graph {
    fn of_tree(src: &Path) -> Graph {
        let mut files = Vec::new();
        collect_rs(src, &mut files);
        assert!(!files.is_empty(), "no .rs files under {}", src.display());
        let sources: Vec<(String, String)> = files
            .iter()
            .map(|f| {
                let rel = f.strip_prefix(src).expect("under src");
                let text = std::fs::read_to_string(f)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", f.display()));
                (rel.to_string_lossy().into_owned(), text)
            })
            .collect();
        Graph::of_sources(&sources)
    }

    /// `sources`: (path relative to `src/`, text).
    fn of_sources(sources: &[(String, String)]) -> Graph {
        let mut graph = Graph::default();
        graph.modules.insert(Vec::new());
        for (rel, _) in sources {
            graph.modules.insert(module_of(Path::new(rel)));
        }
        for (rel, text) in sources {
            let from = module_of(Path::new(rel));
            for r in references(text, &from, &graph.modules) {
                let to = graph.owner(&r.target);
                if to == from {
                    continue;
                }
                graph
                    .edges
                    .entry((display(&from), display(&to)))
                    .or_insert_with(|| Evidence {
                        file: format!("src/{rel}"),
                        line: r.line,
                        path: r.written,
                    });
            }
        }
        graph
    }

    /// The deepest module of the tree that `path` lies in.
    fn owner(&self, path: &[String]) -> Module {
        (0..=path.len())
            .rev()
            .map(|k| path[..k].to_vec())
            .find(|m| self.modules.contains(m))
            .unwrap_or_default()
    }

    fn successors<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.edges
            .keys()
            .filter(move |(from, _)| from == node)
            .map(|(_, to)| to.as_str())
    }

    /// The shortest path from `start` to `goal` (both included), if any.
    fn shortest_path(&self, start: &str, goal: &str) -> Option<Vec<String>> {
        let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = VecDeque::from([start]);
        let mut seen = BTreeSet::from([start]);
        while let Some(node) = queue.pop_front() {
            if node == goal {
                let mut path = vec![node.to_owned()];
                let mut at = node;
                while let Some(prev) = came_from.get(at) {
                    path.push((*prev).to_owned());
                    at = prev;
                }
                path.reverse();
                return Some(path);
            }
            for next in self.successors(node) {
                if seen.insert(next) {
                    came_from.insert(next, node);
                    queue.push_back(next);
                }
            }
        }
        None
    }

    /// One shortest cycle through every edge that lies on a cycle, without
    /// repeats; each starts at its smallest module and is not closed (the
    /// first module is implied again at the end).
    fn cycles(&self) -> Vec<Vec<String>> {
        let mut found = BTreeSet::new();
        for (from, to) in self.edges.keys() {
            if let Some(back) = self.shortest_path(to, from) {
                let mut cycle = vec![from.clone()];
                cycle.extend(back.into_iter().take_while(|m| m != from));
                let smallest = (0..cycle.len())
                    .min_by_key(|&i| &cycle[i])
                    .expect("a cycle has a module");
                cycle.rotate_left(smallest);
                found.insert(cycle);
            }
        }
        found.into_iter().collect()
    }

    fn describe_cycles(&self, cycles: &[Vec<String>]) -> String {
        let mut out = String::new();
        for cycle in cycles {
            let mut closed = cycle.clone();
            closed.push(cycle[0].clone());
            out.push_str(&format!("  {}\n", closed.join(" -> ")));
            for pair in closed.windows(2) {
                let e = &self.edges[&(pair[0].clone(), pair[1].clone())];
                out.push_str(&format!(
                    "      {} -> {}: {}:{} `{}`\n",
                    pair[0], pair[1], e.file, e.line, e.path
                ));
            }
            let family = closed.windows(2).any(|pair| {
                pair[0].starts_with(&format!("{}::", pair[1]))
                    || pair[1].starts_with(&format!("{}::", pair[0]))
            });
            if family {
                // The usual way into this one is splitting a file into a
                // directory and keeping the shared types in mod.rs.
                out.push_str(
                    "      (a module and its child use each other: move what the children \
                     share out of the parent into a child of its own)\n",
                );
            }
        }
        out
    }

    /// Every edge that points up the layer table, and every module the table
    /// does not place.
    fn layer_problems(&self, layers: &[(&str, &[&str])]) -> Vec<String> {
        let mut problems = Vec::new();
        for module in &self.modules {
            if layer_of(layers, &display(module)).is_none() {
                problems.push(format!(
                    "  {} has no layer: add it to LAYERS in tests/module_graph.rs",
                    display(module)
                ));
            }
        }
        for ((from, to), e) in &self.edges {
            let (Some(lf), Some(lt)) = (layer_of(layers, from), layer_of(layers, to)) else {
                continue;
            };
            if lt > lf {
                problems.push(format!(
                    "  {from} (layer {:?}) -> {to} (layer {:?}, later): {}:{} `{}`",
                    layers[lf].0, layers[lt].0, e.file, e.line, e.path
                ));
            }
        }
        problems
    }
}

/// The index in `layers` of the longest entry that is `module` or one of its
/// ancestors; `crate` matches only the root.
fn layer_of(layers: &[(&str, &[&str])], module: &str) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, (_, entries)) in layers.iter().enumerate() {
        for entry in *entries {
            let hit = if *entry == "crate" || module == "crate" {
                *entry == module
            } else {
                module == *entry || module.starts_with(&format!("{entry}::"))
            };
            if hit && best.is_none_or(|(len, _)| entry.len() > len) {
                best = Some((entry.len(), i));
            }
        }
    }
    best.map(|(_, i)| i)
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    out.sort();
}

// ---------------------------------------------------------------------------
// Reading Rust source well enough to find module paths.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
    /// A string, char or number literal (its content does not matter).
    Literal,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_ident_continue(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// Tokens of `src`, without comments (doc comments included) and with every
/// literal reduced to [`Tok::Literal`].
fn lex(src: &str) -> Vec<Token> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    // Advances past chars[i..end], counting lines.
    let skip = |i: &mut usize, end: usize, line: &mut usize| {
        let end = end.min(chars.len());
        *line += chars[*i..end].iter().filter(|&&c| c == '\n').count();
        *i = end;
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c.is_whitespace() {
            {
                let end = i + 1;
                skip(&mut i, end, &mut line);
            }
        } else if c == '/' && next == Some('/') {
            let end = (i..chars.len())
                .find(|&j| chars[j] == '\n')
                .unwrap_or(chars.len());
            skip(&mut i, end, &mut line);
        } else if c == '/' && next == Some('*') {
            // Block comments nest.
            let mut depth = 0;
            let mut j = i;
            while j < chars.len() {
                if chars[j] == '/' && chars.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if chars[j] == '*' && chars.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            skip(&mut i, j, &mut line);
        } else if c == '"' {
            let start_line = line;
            let end = quoted_end(&chars, i + 1, '"');
            skip(&mut i, end, &mut line);
            tokens.push(Token {
                tok: Tok::Literal,
                line: start_line,
            });
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a).
            if next == Some('\\') {
                let end = quoted_end(&chars, i + 1, '\'');
                skip(&mut i, end, &mut line);
                tokens.push(Token {
                    tok: Tok::Literal,
                    line,
                });
            } else if chars.get(i + 2) == Some(&'\'') {
                {
                    let end = i + 3;
                    skip(&mut i, end, &mut line);
                }
                tokens.push(Token {
                    tok: Tok::Literal,
                    line,
                });
            } else {
                let mut j = i + 1;
                while j < chars.len() && is_ident_continue(chars[j]) {
                    j += 1;
                }
                skip(&mut i, j, &mut line);
                tokens.push(Token {
                    tok: Tok::Punct('\''),
                    line,
                });
            }
        } else if is_ident_start(c) {
            let mut j = i;
            while j < chars.len() && is_ident_continue(chars[j]) {
                j += 1;
            }
            let word: String = chars[i..j].iter().collect();
            let start_line = line;
            let after = chars.get(j).copied();
            let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
            let str_prefix = matches!(word.as_str(), "b" | "c");
            if raw_prefix && matches!(after, Some('"') | Some('#')) {
                let hashes = chars[j..].iter().take_while(|&&c| c == '#').count();
                if chars.get(j + hashes) == Some(&'"') {
                    let end = raw_end(&chars, j + hashes + 1, hashes);
                    skip(&mut i, end, &mut line);
                    tokens.push(Token {
                        tok: Tok::Literal,
                        line: start_line,
                    });
                    continue;
                }
                if word == "r" && hashes == 1 {
                    // A raw identifier, r#type.
                    let mut k = j + 1;
                    while k < chars.len() && is_ident_continue(chars[k]) {
                        k += 1;
                    }
                    let name: String = chars[j + 1..k].iter().collect();
                    skip(&mut i, k, &mut line);
                    tokens.push(Token {
                        tok: Tok::Ident(name),
                        line,
                    });
                    continue;
                }
            }
            if str_prefix && after == Some('"') {
                let end = quoted_end(&chars, j + 1, '"');
                skip(&mut i, end, &mut line);
                tokens.push(Token {
                    tok: Tok::Literal,
                    line: start_line,
                });
                continue;
            }
            if word == "b" && after == Some('\'') {
                let end = quoted_end(&chars, j + 1, '\'');
                skip(&mut i, end, &mut line);
                tokens.push(Token {
                    tok: Tok::Literal,
                    line,
                });
                continue;
            }
            skip(&mut i, j, &mut line);
            tokens.push(Token {
                tok: Tok::Ident(word),
                line,
            });
        } else if c.is_ascii_digit() {
            let mut j = i;
            while j < chars.len() && is_ident_continue(chars[j]) {
                j += 1;
            }
            skip(&mut i, j, &mut line);
            tokens.push(Token {
                tok: Tok::Literal,
                line,
            });
        } else if c == ':' && next == Some(':') {
            {
                let end = i + 2;
                skip(&mut i, end, &mut line);
            }
            tokens.push(Token {
                tok: Tok::PathSep,
                line,
            });
        } else {
            {
                let end = i + 1;
                skip(&mut i, end, &mut line);
            }
            tokens.push(Token {
                tok: Tok::Punct(c),
                line,
            });
        }
    }
    tokens
}

/// The index just past the `close` that ends a literal whose content starts
/// at `from`, honouring backslash escapes.
fn quoted_end(chars: &[char], from: usize, close: char) -> usize {
    let mut j = from;
    while j < chars.len() {
        match chars[j] {
            '\\' => j += 2,
            c if c == close => return j + 1,
            _ => j += 1,
        }
    }
    chars.len()
}

/// The index just past `"` followed by `hashes` `#`s.
fn raw_end(chars: &[char], from: usize, hashes: usize) -> usize {
    let mut j = from;
    while j < chars.len() {
        if chars[j] == '"'
            && chars[j + 1..]
                .iter()
                .take(hashes)
                .filter(|&&c| c == '#')
                .count()
                == hashes
        {
            return j + 1 + hashes;
        }
        j += 1;
    }
    chars.len()
}

/// A path in one file that names a module of the tree.
#[derive(Debug, Clone, PartialEq)]
struct Reference {
    /// Absolute, from the crate root; may run past the module into an item.
    target: Vec<String>,
    line: usize,
    /// As written (a `use` group expanded).
    written: String,
}

/// The references of the file whose module is `file_module`; `modules` (the
/// tree's) tells a child module's name from an external crate's.
fn references(src: &str, file_module: &[String], modules: &BTreeSet<Module>) -> Vec<Reference> {
    let tokens = lex(src);
    let ident = |i: usize| match tokens.get(i).map(|t| &t.tok) {
        Some(Tok::Ident(s)) => Some(s.as_str()),
        _ => None,
    };
    let is = |i: usize, tok: &Tok| tokens.get(i).map(|t| &t.tok) == Some(tok);
    let mut out = Vec::new();
    // One entry per open brace: the name of the inline module it opens.
    let mut scopes: Vec<Option<String>> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let current: Module = file_module
            .iter()
            .cloned()
            .chain(scopes.iter().flatten().cloned())
            .collect();
        match &tokens[i].tok {
            Tok::Punct('{') => {
                let inline_mod = match (
                    i.checked_sub(2).and_then(ident),
                    i.checked_sub(1).and_then(ident),
                ) {
                    (Some("mod"), Some(name)) => Some(name.to_owned()),
                    _ => None,
                };
                scopes.push(inline_mod);
                i += 1;
            }
            Tok::Punct('}') => {
                scopes.pop();
                i += 1;
            }
            Tok::Ident(word) if word == "use" && !is(i + 1, &Tok::Punct('<')) => {
                let line = tokens[i].line;
                // `pub use` (or `pub(crate) use`, …): a re-export.
                let re_export = i.checked_sub(1).and_then(ident) == Some("pub")
                    || (i > 0 && is(i - 1, &Tok::Punct(')')) && {
                        let open = (0..i).rev().find(|&k| is(k, &Tok::Punct('(')));
                        open.is_some_and(|k| k > 0 && ident(k - 1) == Some("pub"))
                    });
                let mut paths = Vec::new();
                i += 1;
                use_tree(&tokens, &mut i, Vec::new(), &mut paths);
                for mut path in paths {
                    if path.last().is_some_and(|s| s == "self") {
                        path.pop();
                    }
                    let target = resolve(&path, &current, modules);
                    // A module re-exporting its own children's items is a
                    // facade over them, not a user of them: its children
                    // may still use what the module itself defines.
                    if re_export
                        && target
                            .as_ref()
                            .is_some_and(|t| t.len() > current.len() && t.starts_with(&current))
                    {
                        continue;
                    }
                    if let Some(target) = target {
                        out.push(Reference {
                            target,
                            line,
                            written: path.join("::"),
                        });
                    }
                }
            }
            Tok::Ident(_)
                if is(i + 1, &Tok::PathSep)
                    && !(i > 0 && is(i - 1, &Tok::PathSep))
                    && !(i > 0 && ident(i - 1) == Some("in")) =>
            {
                let line = tokens[i].line;
                let mut path = vec![ident(i).expect("an identifier").to_owned()];
                let mut j = i + 1;
                while is(j, &Tok::PathSep) {
                    match ident(j + 1) {
                        Some(segment) => path.push(segment.to_owned()),
                        None => break,
                    }
                    j += 2;
                }
                if let Some(target) = resolve(&path, &current, modules) {
                    out.push(Reference {
                        target,
                        line,
                        written: path.join("::"),
                    });
                }
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

/// Reads one use tree at `tokens[*i]` (after `use`, or inside a group) and
/// pushes each path it names; stops after the tree, leaving `*i` at the `,`,
/// `}` or `;` that follows.
fn use_tree(tokens: &[Token], i: &mut usize, mut prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    loop {
        match tokens.get(*i).map(|t| &t.tok) {
            Some(Tok::Ident(segment)) => {
                prefix.push(segment.clone());
                *i += 1;
                if tokens.get(*i).map(|t| &t.tok) == Some(&Tok::Ident("as".into())) {
                    *i += 2;
                }
                if tokens.get(*i).map(|t| &t.tok) == Some(&Tok::PathSep) {
                    *i += 1;
                    continue;
                }
                out.push(prefix);
                return;
            }
            Some(Tok::PathSep) => {
                // `use ::name`: an external crate.
                prefix.push("::".into());
                *i += 1;
            }
            Some(Tok::Punct('*')) => {
                *i += 1;
                out.push(prefix);
                return;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                loop {
                    match tokens.get(*i).map(|t| &t.tok) {
                        None => return,
                        Some(Tok::Punct('}')) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Punct(',')) => *i += 1,
                        Some(_) => {
                            let before = *i;
                            use_tree(tokens, i, prefix.clone(), out);
                            if *i == before {
                                *i += 1;
                            }
                        }
                    }
                }
            }
            _ => return,
        }
    }
}

/// The absolute form of `path` written in module `current`, or `None` when
/// it does not start inside this crate.
fn resolve(path: &[String], current: &[String], modules: &BTreeSet<Module>) -> Option<Vec<String>> {
    let (first, rest) = path.split_first()?;
    let mut base: Vec<String> = current.to_vec();
    let mut rest = rest;
    match first.as_str() {
        "crate" => base.clear(),
        name if name == PACKAGE || name == PACKAGE.replace('-', "_") => base.clear(),
        "self" => {}
        "super" => {
            base.pop()?;
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        child => {
            // A child module of the file's module, named without `self::`
            // (2018 paths); anything else is an external crate or a local
            // item.
            let mut candidate = current.to_vec();
            candidate.push(child.to_owned());
            if !modules.contains(&candidate) {
                return None;
            }
            rest = path;
        }
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

// ---------------------------------------------------------------------------
// The check's own tests: small made-up trees, so it is seen to fail.

#[cfg(test)]
mod check {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> Graph {
        let sources: Vec<(String, String)> = files
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect();
        Graph::of_sources(&sources)
    }

    fn edges(g: &Graph) -> Vec<String> {
        g.edges.keys().map(|(f, t)| format!("{f} -> {t}")).collect()
    }

    #[test]
    fn file_paths_name_modules() {
        assert_eq!(display(&module_of(Path::new("lib.rs"))), "crate");
        assert_eq!(display(&module_of(Path::new("main.rs"))), "crate");
        assert_eq!(display(&module_of(Path::new("a/b.rs"))), "a::b");
        assert_eq!(display(&module_of(Path::new("a/b/mod.rs"))), "a::b");
        assert_eq!(display(&module_of(Path::new("a/mod.rs"))), "a");
        assert_eq!(display(&module_of(Path::new("a/lib.rs"))), "a::lib");
    }

    #[test]
    fn comments_strings_and_chars_are_not_code() {
        let src = r####"
            // crate::a::x
            /// crate::b::x
            //! crate::c::x
            /* crate::d /* nested crate::e */ still comment crate::f */
            const S: &str = "crate::g::x \" crate::h";
            const R: &str = r#"crate::i "quoted" crate::j"#;
            const B: &[u8] = b"crate::k";
            const C: char = '"';
            const Q: char = '\'';
            fn lt<'a>(x: &'a str) -> &'a str { x }
            #[doc = "crate::l"]
            fn code() { crate::real::thing(); }
        "####;
        let idents: Vec<Tok> = lex(src).into_iter().map(|t| t.tok).collect();
        for name in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"] {
            assert!(
                !idents.contains(&Tok::Ident(name.into())),
                "{name} leaked out of a comment or literal"
            );
        }
        assert!(idents.contains(&Tok::Ident("real".into())));
        let line = lex(src)
            .into_iter()
            .find(|t| t.tok == Tok::Ident("real".into()))
            .unwrap()
            .line;
        assert_eq!(line, 13, "lines are counted through comments and strings");
    }

    #[test]
    fn use_groups_expand() {
        let g = tree(&[
            ("lib.rs", "mod a; mod b; mod c; mod d;"),
            (
                "a.rs",
                "use crate::{b, c::{self, x as y}, d::*};\nuse std::fmt;",
            ),
            ("b.rs", ""),
            ("c.rs", ""),
            ("d.rs", ""),
        ]);
        assert_eq!(edges(&g), ["a -> b", "a -> c", "a -> d"]);
    }

    #[test]
    fn paths_resolve_to_the_module_that_defines_the_item() {
        let g = tree(&[
            ("lib.rs", "pub mod actors;"),
            (
                "actors/mod.rs",
                "pub mod session; pub mod drain; pub struct Shared;",
            ),
            ("actors/session.rs", "fn f(s: &crate::actors::Shared) {}"),
            (
                "actors/drain.rs",
                "use super::Shared; fn g() { self::h(); }",
            ),
        ]);
        assert_eq!(
            edges(&g),
            ["actors::drain -> actors", "actors::session -> actors"]
        );
    }

    #[test]
    fn mod_declarations_are_not_dependencies() {
        let g = tree(&[
            ("lib.rs", "pub mod a;"),
            ("a/mod.rs", "pub mod b; mod c { }"),
            ("a/b.rs", "use super::super::a; pub(in crate::a) fn f() {}"),
        ]);
        assert_eq!(edges(&g), ["a::b -> a"]);
    }

    #[test]
    fn super_in_an_inline_module_is_its_file() {
        let g = tree(&[
            ("lib.rs", "mod a; mod b;"),
            (
                "a.rs",
                "#[cfg(test)] mod tests { use super::*; fn t() { super::super::b::f(); } }",
            ),
            ("b.rs", ""),
        ]);
        assert_eq!(edges(&g), ["a -> b"]);
    }

    #[test]
    fn child_modules_named_bare_are_dependencies_and_crates_are_not() {
        let g = tree(&[
            ("lib.rs", "mod a;"),
            (
                "a/mod.rs",
                "mod b; use b::X; use serde::Serialize; fn f() { std::mem::drop(1); }",
            ),
            ("a/b.rs", ""),
            ("main.rs", &format!("fn main() {{ {PACKAGE}::a::run() }}")),
        ]);
        assert_eq!(edges(&g), ["a -> a::b", "crate -> a"]);
    }

    #[test]
    fn cycles_are_found_and_named() {
        let g = tree(&[
            ("lib.rs", "mod a; mod b; mod c; mod d;"),
            ("a.rs", "use crate::b::X;"),
            ("b.rs", "use crate::c::Y;"),
            ("c.rs", "use crate::a::Z; use crate::b::W;"),
            ("d.rs", "use crate::a::Z;"),
        ]);
        let cycles = g.cycles();
        let shown: Vec<String> = cycles.iter().map(|c| c.join(" -> ")).collect();
        assert_eq!(shown, ["a -> b -> c", "b -> c"]);
        let text = g.describe_cycles(&cycles);
        assert!(text.contains("  a -> b -> c -> a\n"), "{text}");
        assert!(text.contains("c -> a: src/c.rs:1 `crate::a::Z`"), "{text}");
        assert!(!text.contains("its child"), "{text}");
    }

    #[test]
    fn re_exports_of_children_are_not_dependencies_but_other_uses_are() {
        let g = tree(&[
            ("lib.rs", "mod a;"),
            (
                "a/mod.rs",
                "mod b; mod c; pub use b::X; pub(crate) use c::{Y, Z}; pub struct W;",
            ),
            ("a/b.rs", "use super::W; pub struct X;"),
            ("a/c.rs", "pub struct Y; pub struct Z;"),
        ]);
        assert!(g.cycles().is_empty(), "{:?}", edges(&g));
        let g = tree(&[
            ("lib.rs", "mod a;"),
            (
                "a/mod.rs",
                "mod b; pub use b::X; fn f() { b::run(); } pub struct W;",
            ),
            ("a/b.rs", "use super::W; pub struct X; pub fn run() {}"),
        ]);
        assert_eq!(g.cycles().len(), 1, "{:?}", edges(&g));
    }

    #[test]
    fn a_parent_and_child_using_each_other_is_a_cycle_with_a_hint() {
        let g = tree(&[
            ("lib.rs", "mod s;"),
            (
                "s/mod.rs",
                "mod hello; pub struct Session; fn f() { hello::run(); }",
            ),
            ("s/hello.rs", "use super::Session;"),
        ]);
        let cycles = g.cycles();
        assert_eq!(cycles, [vec!["s".to_owned(), "s::hello".to_owned()]]);
        let text = g.describe_cycles(&cycles);
        assert!(
            text.contains("a module and its child use each other"),
            "{text}"
        );
    }

    #[test]
    fn an_acyclic_tree_has_no_cycles() {
        let g = tree(&[
            ("lib.rs", "mod a; mod b;"),
            ("a.rs", "use crate::b::X;"),
            ("b.rs", ""),
        ]);
        assert!(g.cycles().is_empty());
    }

    #[test]
    fn upward_edges_and_unplaced_modules_are_reported() {
        let layers: &[(&str, &[&str])] = &[
            ("low", &["db", "x::y"]),
            ("high", &["x", "cli"]),
            ("root", &["crate"]),
        ];
        let g = tree(&[
            ("lib.rs", "mod db; mod x; mod cli; mod stray;"),
            ("db/mod.rs", "mod q;"),
            ("db/q.rs", "use crate::cli::Args;"),
            ("x/mod.rs", "mod y; use y::Thing;"),
            ("x/y.rs", ""),
            ("cli.rs", "use crate::db::q; use crate::x::y::Thing;"),
            ("stray.rs", ""),
        ]);
        let problems = g.layer_problems(layers);
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].contains("stray has no layer"), "{problems:#?}");
        assert!(
            problems[1].starts_with(
                "  db::q (layer \"low\") -> cli (layer \"high\", later): src/db/q.rs:1"
            ),
            "{problems:#?}"
        );
    }

    #[test]
    fn the_layer_table_places_every_named_layer_once() {
        let mut seen = BTreeSet::new();
        for (_, entries) in LAYERS {
            for entry in *entries {
                assert!(seen.insert(*entry), "{entry} is in LAYERS twice");
            }
        }
        let order = [
            "protocol",
            "db",
            "routing",
            "actors::conn",
            "actors::drain",
            "actors::registry",
            "actors::session",
            "http",
            "broker",
            "cli",
        ];
        let at: Vec<usize> = order.iter().map(|m| layer_of(LAYERS, m).unwrap()).collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "issue 7's order: {at:?}"
        );
        assert_eq!(layer_of(LAYERS, "db::queries"), layer_of(LAYERS, "db"));
        assert_eq!(layer_of(LAYERS, "crate"), Some(LAYERS.len() - 1));
    }
}
