//! The module tree shows the architecture: among the top-level modules of each crate's library
//! and binaries, dependencies point one way.
//!
//! A top-level module is a `mod x;` of the crate root, made of `x.rs` and every file under
//! `x/`. Module `a` depends on module `b` when a file of `a` names `b` through `crate::`, or
//! through `super::` reaching the crate root, in imports (grouped ones included) or in code. A
//! name the root re-exports (`pub use config::Config;`) counts as its module. Comments and
//! string literals do not count; `#[path]` attributes and glob imports of the root are not
//! followed.
//!
//! `cargo test -p cplink-e2e --test module_cycles -- --nocapture` prints each crate's graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The crates checked, by directory: every crate of the workspace.
const CRATES: &[&str] = &[
    "proto", "runtime", "agent", "server", "operator", "cli", "tests",
];

/// Most cycles listed per crate root: past a few dozen, more say nothing new.
const MAX_CYCLES: usize = 50;

#[test]
fn no_cycle_remains_among_the_top_level_modules_of_the_crates_checked() -> anyhow::Result<()> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("tests/ has a parent")?;
    let mut failures = String::new();
    for dir in CRATES {
        let targets = targets(workspace, dir)?;
        assert!(
            targets.iter().any(|t| !t.modules.is_empty()),
            "{dir}: no crate root declares a module; is the path right?"
        );
        for target in targets.iter().filter(|t| !t.modules.is_empty()) {
            let graph = graph(target);
            println!("{}", render_graph(target, &graph));
            let cycles = render_cycles(&target.label, &graph);
            failures.push_str(&cycles);
        }
    }
    assert!(
        failures.is_empty(),
        "top-level modules depend on each other in cycles:\n{failures}"
    );
    Ok(())
}

// --- Reading source: just enough lexing to tell paths from comments and strings. ---

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Open,
    Close,
    Comma,
    Star,
    Semi,
    Other,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

/// The tokens of `source` that matter to paths, comments and string and char literals left
/// out.
fn tokenize(source: &str) -> Vec<Token> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut at = 0;
    while at < chars.len() {
        let next = chars.get(at + 1).copied();
        let mut push = |tok| tokens.push(Token { tok, line });
        match chars[at] {
            '\n' => {
                line += 1;
                at += 1;
            }
            c if c.is_whitespace() => at += 1,
            '/' if next == Some('/') => {
                while at < chars.len() && chars[at] != '\n' {
                    at += 1;
                }
            }
            '/' if next == Some('*') => at = skip_block_comment(&chars, at, &mut line),
            '"' => at = skip_string(&chars, at + 1, &mut line),
            '\'' => at = skip_char_or_lifetime(&chars, at),
            ':' if next == Some(':') => {
                push(Tok::PathSep);
                at += 2;
            }
            '{' | '}' | ',' | '*' | ';' => {
                push(match chars[at] {
                    '{' => Tok::Open,
                    '}' => Tok::Close,
                    ',' => Tok::Comma,
                    '*' => Tok::Star,
                    _ => Tok::Semi,
                });
                at += 1;
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = at;
                while at < chars.len() && (chars[at].is_alphanumeric() || chars[at] == '_') {
                    at += 1;
                }
                let word: String = chars[start..at].iter().collect();
                match (word.as_str(), chars.get(at)) {
                    ("r" | "br" | "cr", Some('"' | '#')) if raw_string_at(&chars, at) => {
                        at = skip_raw_string(&chars, at, &mut line);
                    }
                    ("b" | "c", Some('"')) => at = skip_string(&chars, at + 1, &mut line),
                    ("b", Some('\'')) => at = skip_char_or_lifetime(&chars, at),
                    // A raw identifier, `r#type`.
                    ("r", Some('#')) => {
                        let start = at + 1;
                        at = start;
                        while at < chars.len() && (chars[at].is_alphanumeric() || chars[at] == '_')
                        {
                            at += 1;
                        }
                        push(Tok::Ident(chars[start..at].iter().collect()));
                    }
                    _ => push(Tok::Ident(word)),
                }
            }
            // Number literals, suffixes included (`1u8`, `0x1f`).
            c if c.is_ascii_digit() => {
                while at < chars.len() && (chars[at].is_alphanumeric() || chars[at] == '_') {
                    at += 1;
                }
            }
            _ => {
                push(Tok::Other);
                at += 1;
            }
        }
    }
    tokens
}

/// Past a block comment starting at `at` (`/*`); they nest.
fn skip_block_comment(chars: &[char], mut at: usize, line: &mut usize) -> usize {
    let mut depth = 0;
    while at < chars.len() {
        match (chars[at], chars.get(at + 1)) {
            ('/', Some('*')) => {
                depth += 1;
                at += 2;
            }
            ('*', Some('/')) => {
                depth -= 1;
                at += 2;
                if depth == 0 {
                    return at;
                }
            }
            (c, _) => {
                if c == '\n' {
                    *line += 1;
                }
                at += 1;
            }
        }
    }
    at
}

/// Past a string whose contents start at `at` (just after the opening quote).
fn skip_string(chars: &[char], mut at: usize, line: &mut usize) -> usize {
    while at < chars.len() {
        match chars[at] {
            '"' => return at + 1,
            '\\' => {
                if chars.get(at + 1) == Some(&'\n') {
                    *line += 1;
                }
                at += 2;
            }
            c => {
                if c == '\n' {
                    *line += 1;
                }
                at += 1;
            }
        }
    }
    at
}

/// Whether `chars[at..]` (after an `r`) opens a raw string: hashes, then a quote.
fn raw_string_at(chars: &[char], at: usize) -> bool {
    let hashes = chars[at..].iter().take_while(|c| **c == '#').count();
    chars.get(at + hashes) == Some(&'"')
}

/// Past a raw string whose hashes (or opening quote) start at `at`.
fn skip_raw_string(chars: &[char], at: usize, line: &mut usize) -> usize {
    let hashes = chars[at..].iter().take_while(|c| **c == '#').count();
    let mut at = at + hashes + 1;
    while at < chars.len() {
        if chars[at] == '"' && chars[at + 1..].iter().take(hashes).all(|c| *c == '#') {
            return at + 1 + hashes;
        }
        if chars[at] == '\n' {
            *line += 1;
        }
        at += 1;
    }
    at
}

/// Past a char literal (`'x'`, `'\n'`, `'"'`) or the quote of a lifetime (`'a`) at `at`.
fn skip_char_or_lifetime(chars: &[char], at: usize) -> usize {
    if chars.get(at + 1) == Some(&'\\') {
        // The escaped character, then whatever precedes the closing quote (`\u{..}`).
        let mut end = at + 3;
        while end < chars.len() && chars[end] != '\'' {
            end += 1;
        }
        return end + 1;
    }
    if chars.get(at + 2) == Some(&'\'') {
        return at + 3;
    }
    at + 1
}

// --- Paths and imports. ---

/// A path as written (`crate::a::b`, one leaf of a grouped import), where it starts, and the
/// name an import binds it to (`as`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Named {
    segments: Vec<String>,
    alias: Option<String>,
    line: usize,
}

fn tok(tokens: &[Token], at: usize) -> Option<&Tok> {
    tokens.get(at).map(|t| &t.tok)
}

/// Reads a path or use tree starting at `tokens[at]`, appending each leaf (after `prefix`) to
/// `out`: `a::b`, `a::{b, c::{d, e as f}}`, `a::*`. A path in code ends where `::` is followed
/// by something else (`::<T>`). Returns the position after it.
fn use_tree(tokens: &[Token], mut at: usize, prefix: &[String], out: &mut Vec<Named>) -> usize {
    let line = tokens.get(at).map_or(0, |t| t.line);
    let mut segments = prefix.to_vec();
    loop {
        match tok(tokens, at) {
            Some(Tok::Ident(name)) => {
                segments.push(name.clone());
                at += 1;
            }
            Some(Tok::Star) => {
                segments.push("*".into());
                out.push(Named {
                    segments,
                    alias: None,
                    line,
                });
                return at + 1;
            }
            Some(Tok::Open) => {
                at += 1;
                loop {
                    match tok(tokens, at) {
                        None => return at,
                        Some(Tok::Close) => return at + 1,
                        Some(Tok::Comma) => at += 1,
                        Some(_) => at = use_tree(tokens, at, &segments, out).max(at + 1),
                    }
                }
            }
            _ => break,
        }
        if tok(tokens, at) == Some(&Tok::PathSep) {
            at += 1;
        } else {
            break;
        }
    }
    let mut alias = None;
    if let (Some(Tok::Ident(keyword)), Some(Tok::Ident(name))) =
        (tok(tokens, at), tok(tokens, at + 1))
        && keyword == "as"
    {
        alias = Some(name.clone());
        at += 2;
    }
    if segments.len() > prefix.len() {
        out.push(Named {
            segments,
            alias,
            line,
        });
    }
    at
}

/// `segments` (starting with `crate` or `super`) as a path from the crate root, from a file of
/// module `here`; `None` for other paths and for `super` above the root.
fn resolve(segments: &[String], here: &[String]) -> Option<Vec<String>> {
    let (mut absolute, rest) = match segments.first()?.as_str() {
        "crate" => (Vec::new(), &segments[1..]),
        "super" => {
            let ups = segments.iter().take_while(|s| *s == "super").count();
            let kept = here.len().checked_sub(ups)?;
            (here[..kept].to_vec(), &segments[ups..])
        }
        _ => return None,
    };
    absolute.extend(rest.iter().filter(|s| *s != "self").cloned());
    Some(absolute)
}

/// Every `crate::` and `super::` path in `source`, as a path from the crate root. `module` is
/// the module the file is (`["reconciler", "tests"]` for `src/reconciler/tests.rs`); inline
/// modules (`mod tests { .. }`) inside the file are followed.
fn crate_paths(source: &str, module: &[String]) -> Vec<Named> {
    let tokens = tokenize(source);
    // Inline modules we are in, with the brace depth of their bodies.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut paths = Vec::new();
    let mut at = 0;
    while at < tokens.len() {
        match &tokens[at].tok {
            Tok::Open => depth += 1,
            Tok::Close => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(keyword) if keyword == "mod" => {
                if let (Some(Tok::Ident(name)), Some(Tok::Open)) =
                    (tok(&tokens, at + 1), tok(&tokens, at + 2))
                {
                    depth += 1;
                    inline.push((name.clone(), depth));
                    at += 3;
                    continue;
                }
            }
            Tok::Ident(first)
                if (first == "crate" || first == "super")
                    && tok(&tokens, at + 1) == Some(&Tok::PathSep)
                    && (at == 0 || tokens[at - 1].tok != Tok::PathSep) =>
            {
                let here: Vec<String> = module
                    .iter()
                    .cloned()
                    .chain(inline.iter().map(|(name, _)| name.clone()))
                    .collect();
                let mut named = Vec::new();
                at = use_tree(&tokens, at, &[], &mut named).max(at + 1);
                paths.extend(named.into_iter().filter_map(|n| {
                    Some(Named {
                        segments: resolve(&n.segments, &here)?,
                        ..n
                    })
                }));
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    paths
}

/// What a crate root declares: its top-level modules (`mod x;`), and the names its imports
/// bring into the root (`pub use config::Config;`), each with the module it comes from.
#[derive(Debug, Default, PartialEq, Eq)]
struct Root {
    modules: BTreeSet<String>,
    aliases: BTreeMap<String, String>,
}

fn root_items(source: &str) -> Root {
    let tokens = tokenize(source);
    let mut root = Root::default();
    let mut imports = Vec::new();
    let mut depth = 0usize;
    let mut at = 0;
    while at < tokens.len() {
        match (&tokens[at].tok, tok(&tokens, at + 1), tok(&tokens, at + 2)) {
            (Tok::Open, _, _) => depth += 1,
            (Tok::Close, _, _) => depth = depth.saturating_sub(1),
            (Tok::Ident(keyword), Some(Tok::Ident(name)), Some(Tok::Semi))
                if keyword == "mod" && depth == 0 =>
            {
                root.modules.insert(name.clone());
            }
            (Tok::Ident(keyword), Some(Tok::Ident(_) | Tok::Open), _)
                if keyword == "use" && depth == 0 =>
            {
                at = use_tree(&tokens, at + 1, &[], &mut imports);
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    for import in imports {
        let mut segments: Vec<&str> = import.segments.iter().map(String::as_str).collect();
        if matches!(segments.first(), Some(&"crate" | &"self")) {
            segments.remove(0);
        }
        let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
            continue;
        };
        if !root.modules.contains(*first) || *last == "*" {
            continue;
        }
        let bound = match (&import.alias, *last) {
            (Some(alias), _) => alias.as_str(),
            (None, "self") if segments.len() > 1 => segments[segments.len() - 2],
            (None, name) => name,
        };
        if bound != "_" && !root.modules.contains(bound) {
            root.aliases.insert(bound.to_owned(), (*first).to_owned());
        }
    }
    root
}

// --- Crates, their roots and their module graphs. ---

/// One source file of a top-level module.
#[derive(Debug, Clone)]
struct SourceFile {
    /// Path shown in evidence, from the workspace root.
    path: String,
    /// The module the file is: `["reconciler", "tests"]` for `src/reconciler/tests.rs`.
    module: Vec<String>,
    source: String,
}

/// A crate root (library or binary) and the files of its top-level modules.
#[derive(Debug)]
struct Target {
    label: String,
    modules: BTreeSet<String>,
    aliases: BTreeMap<String, String>,
    files: Vec<SourceFile>,
}

/// `(from, to)` → the first `file:line` that makes `from` depend on `to`.
type Graph = BTreeMap<(String, String), String>;

fn graph(target: &Target) -> Graph {
    let mut graph = Graph::new();
    for file in &target.files {
        let Some(from) = file.module.first() else {
            continue;
        };
        for path in crate_paths(&file.source, &file.module) {
            let Some(first) = path.segments.first() else {
                continue;
            };
            let to = match target.aliases.get(first) {
                _ if target.modules.contains(first) => first,
                Some(module) => module,
                None => continue,
            };
            if to != from {
                graph
                    .entry((from.clone(), to.clone()))
                    .or_insert_with(|| format!("{}:{}", file.path, path.line));
            }
        }
    }
    graph
}

/// The crate's roots with modules: the library and binaries Cargo finds by convention, and the
/// `path`s its manifest names.
fn targets(workspace: &Path, dir: &str) -> anyhow::Result<Vec<Target>> {
    let crate_dir = workspace.join(dir);
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml"))
        .with_context(|| format!("reading {dir}/Cargo.toml"))?;
    let package = manifest_value(&manifest, "package", "name")
        .next()
        .with_context(|| format!("{dir}/Cargo.toml names no package"))?;

    let mut roots: BTreeSet<PathBuf> = BTreeSet::new();
    for conventional in ["src/lib.rs", "src/main.rs"] {
        roots.insert(PathBuf::from(conventional));
    }
    if let Ok(bins) = std::fs::read_dir(crate_dir.join("src/bin")) {
        for entry in bins {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if let Some(name) = name {
                roots.insert(if path.is_dir() {
                    PathBuf::from(format!("src/bin/{name}/main.rs"))
                } else {
                    PathBuf::from(format!("src/bin/{name}"))
                });
            }
        }
    }
    for section in ["lib", "bin"] {
        roots.extend(manifest_value(&manifest, section, "path").map(PathBuf::from));
    }

    let mut targets = Vec::new();
    for root in roots.iter().filter(|r| crate_dir.join(r).is_file()) {
        let label = if root == Path::new("src/lib.rs") {
            package.clone()
        } else {
            format!("{package} ({})", root.display())
        };
        targets.push(load(workspace, &Path::new(dir).join(root), label)?);
    }
    Ok(targets)
}

/// Values of `key = "value"` lines in the `[section]` or `[[section]]` tables of a manifest.
fn manifest_value<'a>(
    manifest: &'a str,
    section: &'a str,
    key: &'a str,
) -> impl Iterator<Item = String> + 'a {
    let mut current = "";
    manifest.lines().filter_map(move |line| {
        let line = line.trim();
        if line.starts_with('[') {
            current = line.trim_matches(|c| c == '[' || c == ']');
            return None;
        }
        let (k, v) = line.split_once('=')?;
        (current == section && k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
    })
}

fn load(workspace: &Path, root: &Path, label: String) -> anyhow::Result<Target> {
    let source = std::fs::read_to_string(workspace.join(root))
        .with_context(|| format!("reading {}", root.display()))?;
    let Root { modules, aliases } = root_items(&source);
    let dir = root.parent().context("a crate root is in a directory")?;
    let mut files = Vec::new();
    for module in &modules {
        let file = dir.join(format!("{module}.rs"));
        if workspace.join(&file).is_file() {
            files.push(read(workspace, &file, vec![module.clone()])?);
        }
        let below = dir.join(module);
        collect(workspace, &below, std::slice::from_ref(module), &mut files)?;
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Target {
        label,
        modules,
        aliases,
        files,
    })
}

/// Every `.rs` file under `dir` (relative to the workspace), module `module` or below it.
fn collect(
    workspace: &Path,
    dir: &Path,
    module: &[String],
    files: &mut Vec<SourceFile>,
) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(workspace.join(dir)) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = dir.join(&name);
        if entry.file_type()?.is_dir() {
            let mut below = module.to_vec();
            below.push(name);
            collect(workspace, &path, &below, files)?;
        } else if let Some(stem) = name.strip_suffix(".rs") {
            let mut of = module.to_vec();
            if stem != "mod" {
                of.push(stem.to_owned());
            }
            files.push(read(workspace, &path, of)?);
        }
    }
    Ok(())
}

fn read(workspace: &Path, path: &Path, module: Vec<String>) -> anyhow::Result<SourceFile> {
    Ok(SourceFile {
        path: path.display().to_string(),
        module,
        source: std::fs::read_to_string(workspace.join(path))
            .with_context(|| format!("reading {}", path.display()))?,
    })
}

fn render_graph(target: &Target, graph: &Graph) -> String {
    let modules: Vec<&str> = target.modules.iter().map(String::as_str).collect();
    let mut out = format!(
        "{}: {} modules ({}), {} edges\n",
        target.label,
        modules.len(),
        modules.join(", "),
        graph.len()
    );
    for ((from, to), at) in graph {
        out.push_str(&format!("    {from} -> {to}  ({at})\n"));
    }
    out
}

// --- Cycles. ---

/// The strongly connected components of more than one module (Tarjan), each sorted.
fn strongly_connected(graph: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        successors: BTreeMap<&'a str, Vec<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        components: Vec<Vec<String>>,
    }

    impl<'a> Tarjan<'a> {
        fn visit(&mut self, node: &'a str) {
            let index = self.index.len();
            self.index.insert(node, index);
            self.low.insert(node, index);
            self.stack.push(node);
            self.on_stack.insert(node);
            for next in self.successors.get(node).cloned().unwrap_or_default() {
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(member) = self.stack.pop() {
                    self.on_stack.remove(member);
                    component.push(member.to_owned());
                    if member == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.components.push(component);
                }
            }
        }
    }

    let mut tarjan = Tarjan {
        successors: successors(graph),
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    let nodes: Vec<&str> = tarjan.successors.keys().copied().collect();
    for node in nodes {
        if !tarjan.index.contains_key(node) {
            tarjan.visit(node);
        }
    }
    tarjan.components.sort();
    tarjan.components
}

fn successors(graph: &Graph) -> BTreeMap<&str, Vec<&str>> {
    let mut successors: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in graph.keys() {
        successors.entry(from).or_default().push(to);
        successors.entry(to).or_default();
    }
    successors
}

/// The elementary cycles inside one component, each starting at its smallest module, in
/// order; at most `limit`, and whether there were more.
fn cycles_in(component: &[String], graph: &Graph, limit: usize) -> (Vec<Vec<String>>, bool) {
    fn walk(
        path: &mut Vec<String>,
        successors: &BTreeMap<&str, Vec<&str>>,
        members: &BTreeSet<&str>,
        found: &mut Vec<Vec<String>>,
        limit: usize,
    ) -> bool {
        let start = path[0].clone();
        let last = path[path.len() - 1].clone();
        for next in successors.get(last.as_str()).into_iter().flatten() {
            if *next == start {
                if found.len() == limit {
                    return true;
                }
                let mut cycle = path.clone();
                cycle.push(start.clone());
                found.push(cycle);
            } else if members.contains(next)
                && *next > start.as_str()
                && !path.iter().any(|p| p == next)
            {
                path.push((*next).to_owned());
                if walk(path, successors, members, found, limit) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }

    let successors = successors(graph);
    let members: BTreeSet<&str> = component.iter().map(String::as_str).collect();
    let mut found = Vec::new();
    for start in component {
        let mut path = vec![start.clone()];
        if walk(&mut path, &successors, &members, &mut found, limit) {
            return (found, true);
        }
    }
    (found, false)
}

/// Every cycle as `crate: a -> b -> a`, each edge with a `file:line` that makes it; empty when
/// there is none.
fn render_cycles(label: &str, graph: &Graph) -> String {
    let mut out = String::new();
    let mut listed = 0;
    for component in strongly_connected(graph) {
        let (cycles, more) = cycles_in(&component, graph, MAX_CYCLES.saturating_sub(listed));
        listed += cycles.len();
        for cycle in cycles {
            out.push_str(&format!("{label}: {}\n", cycle.join(" -> ")));
            for edge in cycle.windows(2) {
                let at = &graph[&(edge[0].clone(), edge[1].clone())];
                out.push_str(&format!("    {} -> {}: {at}\n", edge[0], edge[1]));
            }
        }
        if more {
            out.push_str(&format!(
                "{label}: more cycles among {}\n",
                component.join(", ")
            ));
        }
    }
    out
}

// --- The reading of source, on small inline examples. ---

fn paths_in(source: &str, module: &[&str]) -> Vec<(String, usize)> {
    let module: Vec<String> = module.iter().map(|m| (*m).to_owned()).collect();
    crate_paths(source, &module)
        .into_iter()
        .map(|p| (p.segments.join("::"), p.line))
        .collect()
}

fn owned(paths: &[(&str, usize)]) -> Vec<(String, usize)> {
    paths.iter().map(|(p, l)| ((*p).to_owned(), *l)).collect()
}

#[test]
fn a_grouped_import_names_each_of_its_leaves() {
    let source = "use crate::{a, b::c, d as e};\n";
    assert_eq!(
        paths_in(source, &["m"]),
        owned(&[("a", 1), ("b::c", 1), ("d", 1)])
    );
}

#[test]
fn nested_groups_spread_over_lines_name_each_leaf_on_its_line() {
    let source = "use crate::{\n    a::{b, c::{d, self}},\n    e::*,\n};\n";
    assert_eq!(
        paths_in(source, &["m"]),
        owned(&[("a::b", 2), ("a::c::d", 2), ("a::c", 2), ("e::*", 3)])
    );
}

#[test]
fn paths_in_code_count_and_visibility_does_not() {
    let source = "pub(crate) fn f() {\n    let x = crate::a::new::<u8>();\n    crate::b::C\n}\n";
    assert_eq!(
        paths_in(source, &["m"]),
        owned(&[("a::new", 2), ("b::C", 3)])
    );
}

#[test]
fn super_resolves_from_where_the_file_sits() {
    assert_eq!(
        paths_in("use super::n::X;\n", &["m"]),
        owned(&[("n::X", 1)])
    );
    assert_eq!(
        paths_in(
            "use super::{y, z::w};\nsuper::super::o::f();\n",
            &["m", "x"]
        ),
        owned(&[("m::y", 1), ("m::z::w", 1), ("o::f", 2)])
    );
    assert_eq!(
        paths_in("use super::super::super::n;\n", &["m", "x"]),
        Vec::new(),
        "`super` above the crate root names nothing"
    );
}

#[test]
fn super_inside_an_inline_module_goes_up_from_that_module() {
    let source = "\
fn f() { let _ = { 1 }; }
#[cfg(test)]
mod tests {
    use super::*;
    use super::super::n;
    fn g() { if true { super::h() } }
}
use super::o;
";
    assert_eq!(
        paths_in(source, &["m"]),
        owned(&[("m::*", 4), ("n", 5), ("m::h", 6), ("o", 8)])
    );
}

#[test]
fn comments_and_doc_comments_name_nothing() {
    let source = "\
// use crate::a;
/// See [`crate::b`].
//! [`crate::c`]
/* crate::d /* nested */ crate::e */
let x = 1; // crate::f
use crate::g;
";
    assert_eq!(paths_in(source, &["m"]), owned(&[("g", 6)]));
}

#[test]
fn string_and_char_literals_name_nothing() {
    let source = r####"
let a = "crate::a \" crate::b";
let b = r#"crate::c " crate::d"#;
let c = b"crate::e";
let d = ('"', '\'', '\u{22}', b'"');
fn e<'a>(x: &'a str) -> &'a str { crate::f::g(x) }
let r#type = crate::h;
"####;
    assert_eq!(paths_in(source, &["m"]), owned(&[("f::g", 6), ("h", 7)]));
}

#[test]
fn a_root_declares_modules_and_the_names_it_re_exports() {
    let root = root_items(
        "//! Docs.\n\
         pub mod config;\n\
         mod links;\n\
         pub(crate) mod pool;\n\
         pub use config::{Args, Config as Settings};\n\
         use links::Links;\n\
         use pool::{self, *};\n\
         use std::sync::Arc;\n\
         mod tests { mod inner; }\n",
    );
    assert_eq!(
        root.modules,
        ["config", "links", "pool"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    assert_eq!(
        root.aliases,
        [
            ("Args", "config"),
            ("Links", "links"),
            ("Settings", "config")
        ]
        .map(|(n, m)| (n.to_owned(), m.to_owned()))
        .into_iter()
        .collect()
    );
}

fn target(root: &str, files: &[(&str, &str)]) -> Target {
    let Root { modules, aliases } = root_items(root);
    let files = files
        .iter()
        .map(|(path, source)| {
            let module = path
                .trim_end_matches(".rs")
                .split('/')
                .filter(|s| *s != "mod")
                .map(String::from)
                .collect();
            SourceFile {
                path: format!("src/{path}"),
                module,
                source: (*source).to_owned(),
            }
        })
        .collect();
    Target {
        label: "demo".into(),
        modules,
        aliases,
        files,
    }
}

#[test]
fn edges_join_top_level_modules_through_every_file_and_re_export() {
    let target = target(
        "mod a; mod b; mod c; pub use c::Thing;",
        &[
            ("a.rs", "use crate::a::x;\nuse crate::b;\n"),
            ("a/deep/mod.rs", "\n\nfn f() -> crate::Thing { todo!() }\n"),
            ("b.rs", "use crate::nothing_here;\n"),
        ],
    );
    let edges: Vec<(String, String, String)> = graph(&target)
        .into_iter()
        .map(|((from, to), at)| (from, to, at))
        .collect();
    assert_eq!(
        edges,
        [("a", "b", "src/a.rs:2"), ("a", "c", "src/a/deep/mod.rs:3")]
            .map(|(f, t, at)| (f.to_owned(), t.to_owned(), at.to_owned()))
            .to_vec()
    );
}

#[test]
fn every_cycle_is_listed_with_the_lines_that_make_it() {
    let target = target(
        "mod a; mod b; mod c; mod d;",
        &[
            ("a.rs", "use crate::b;\n"),
            ("b.rs", "use crate::{a, c};\n"),
            ("c/mod.rs", "\nuse super::a;\n"),
            ("d.rs", "use crate::a;\n"),
        ],
    );
    let graph = graph(&target);
    assert_eq!(
        strongly_connected(&graph),
        vec![vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]]
    );
    assert_eq!(
        render_cycles("demo", &graph),
        "demo: a -> b -> a\n    a -> b: src/a.rs:1\n    b -> a: src/b.rs:1\n\
         demo: a -> b -> c -> a\n    a -> b: src/a.rs:1\n    b -> c: src/b.rs:1\n    \
         c -> a: src/c/mod.rs:2\n"
    );
}

#[test]
fn a_graph_without_cycles_reports_nothing() {
    let target = target(
        "mod a; mod b; mod c;",
        &[
            ("a.rs", "use crate::{b, c};\n"),
            ("b.rs", "use crate::c;\n"),
        ],
    );
    assert_eq!(render_cycles("demo", &graph(&target)), "");
}

#[test]
fn a_listing_of_many_cycles_stops_at_the_limit_and_says_so() {
    let target = target(
        "mod a; mod b; mod c;",
        &[
            ("a.rs", "use crate::{b, c};\n"),
            ("b.rs", "use crate::{a, c};\n"),
            ("c.rs", "use crate::{a, b};\n"),
        ],
    );
    let graph = graph(&target);
    let (cycles, more) = cycles_in(&strongly_connected(&graph)[0], &graph, 2);
    assert_eq!(cycles.len(), 2);
    assert!(more);
    let (all, more) = cycles_in(&strongly_connected(&graph)[0], &graph, 10);
    assert_eq!(all.len(), 5, "{all:?}");
    assert!(!more);
}
