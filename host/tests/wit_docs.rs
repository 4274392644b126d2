//! The WIT reference of the plugin guide (`docs/wit.md`) is rendered from the WIT packages
//! (`sdk/wit/*/agent.wit`) with wit-parser: every interface, world, type and function with
//! its documentation, so the guide cannot drift from the contract. After a WIT change,
//! `STAIRCASE_BLESS=1 cargo test --test wit_docs` writes it again.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use wit_parser::{
    Docs, Function, FunctionKind, Handle, InterfaceId, Resolve, Type, TypeDefKind, TypeId,
    WorldItem,
};

/// The packages, oldest first (a newer one holds only what it adds or changes).
const VERSIONS: [&str; 3] = ["v0.1.0", "v0.2.0", "v0.3.0"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_wit_reference_in_the_docs_is_rendered_from_the_wit_files() {
    let rendered = render();
    let path = repo().join("docs/wit.md");
    if std::env::var_os("STAIRCASE_BLESS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == rendered,
        "docs/wit.md is not what the WIT files say; write it again with \
         STAIRCASE_BLESS=1 cargo test --test wit_docs"
    );
    // Every function of every package is in it, documented.
    for version in VERSIONS {
        let (resolve, _) = parse(version);
        for (_, interface) in resolve.interfaces.iter() {
            for function in interface.functions.values() {
                assert!(
                    function.docs.contents.is_some(),
                    "{version}: {} has no documentation",
                    function.name
                );
                assert!(rendered.contains(&signature(&resolve, function)));
            }
        }
    }
}

fn parse(version: &str) -> (Resolve, wit_parser::PackageId) {
    let mut resolve = Resolve::default();
    let file = repo().join("sdk/wit").join(version).join("agent.wit");
    let package = resolve.push_file(&file).unwrap();
    (resolve, package)
}

fn render() -> String {
    let mut out = String::from(
        "# WIT reference\n\n\
         <!-- Generated from sdk/wit/*/agent.wit by host/tests/wit_docs.rs; do not edit. -->\n\n\
         What a plugin imports and exports, package by package, with the documentation the WIT\n\
         files carry. A plugin targets one world of one package (`staircase plugin wit --out DIR`\n\
         writes these files; [plugins](plugins.md) says which kind uses which).\n",
    );
    for version in VERSIONS {
        let (resolve, id) = parse(version);
        let package = &resolve.packages[id];
        let _ = writeln!(
            out,
            "\n## `{}`\n\n[`sdk/wit/{version}/agent.wit`](../sdk/wit/{version}/agent.wit)\n",
            package.name
        );
        paragraph(&mut out, &package.docs, "");
        out.push('\n');
        for (name, world) in &package.worlds {
            let world = &resolve.worlds[*world];
            let items = |items: &mut dyn Iterator<Item = &WorldItem>| -> String {
                let names: Vec<String> = items
                    .filter_map(|item| match item {
                        WorldItem::Interface { id, .. } => resolve.interfaces[*id].name.clone(),
                        _ => None,
                    })
                    .map(|name| format!("`{name}`"))
                    .collect();
                names.join(", ")
            };
            let _ = writeln!(
                out,
                "- world `{name}`: imports {}; exports {}",
                items(&mut world.imports.values()),
                items(&mut world.exports.values())
            );
            paragraph(&mut out, &world.docs, "  ");
        }
        for (name, interface) in &package.interfaces {
            render_interface(&mut out, &resolve, name, *interface);
        }
    }
    out
}

fn render_interface(out: &mut String, resolve: &Resolve, name: &str, id: InterfaceId) {
    let interface = &resolve.interfaces[id];
    let _ = writeln!(out, "\n### interface `{name}`\n");
    paragraph(out, &interface.docs, "");
    for (type_name, type_id) in &interface.types {
        let def = &resolve.types[*type_id];
        let (keyword, members) = match &def.kind {
            TypeDefKind::Record(record) => (
                "record",
                record
                    .fields
                    .iter()
                    .map(|f| {
                        (
                            format!("{}: {}", f.name, type_name_of(resolve, &f.ty)),
                            &f.docs,
                        )
                    })
                    .collect(),
            ),
            TypeDefKind::Enum(e) => (
                "enum",
                e.cases.iter().map(|c| (c.name.clone(), &c.docs)).collect(),
            ),
            TypeDefKind::Variant(v) => (
                "variant",
                v.cases
                    .iter()
                    .map(|c| {
                        let name = match &c.ty {
                            Some(ty) => format!("{}({})", c.name, type_name_of(resolve, ty)),
                            None => c.name.clone(),
                        };
                        (name, &c.docs)
                    })
                    .collect(),
            ),
            TypeDefKind::Flags(f) => (
                "flags",
                f.flags.iter().map(|c| (c.name.clone(), &c.docs)).collect(),
            ),
            TypeDefKind::Resource => ("resource", Vec::new()),
            TypeDefKind::Type(Type::Id(_)) => continue, // a `use` of another interface's type
            _ => ("type", Vec::new()),
        };
        let _ = writeln!(out, "- {keyword} `{type_name}`");
        paragraph(out, &def.docs, "  ");
        for (member, docs) in members {
            let _ = writeln!(out, "  - `{member}`");
            paragraph(out, docs, "    ");
        }
        for function in methods_of(interface.functions.values(), *type_id) {
            let _ = writeln!(out, "  - `{}`", signature(resolve, function));
            paragraph(out, &function.docs, "    ");
        }
    }
    for function in interface.functions.values() {
        if matches!(function.kind, FunctionKind::Freestanding) {
            let _ = writeln!(out, "- `{}`", signature(resolve, function));
            paragraph(out, &function.docs, "  ");
        }
    }
}

/// A resource's constructor, methods and static functions.
fn methods_of<'a>(
    functions: impl Iterator<Item = &'a Function>,
    resource: TypeId,
) -> impl Iterator<Item = &'a Function> {
    functions.filter(move |f| {
        matches!(f.kind, FunctionKind::Method(id) | FunctionKind::Constructor(id) | FunctionKind::Static(id) if id == resource)
    })
}

fn signature(resolve: &Resolve, function: &Function) -> String {
    let params: Vec<String> = function
        .params
        .iter()
        .filter(|p| p.name != "self")
        .map(|p| format!("{}: {}", p.name, type_name_of(resolve, &p.ty)))
        .collect();
    let result = match (&function.kind, &function.result) {
        (FunctionKind::Constructor(_), _) | (_, None) => String::new(),
        (_, Some(ty)) => format!(" -> {}", type_name_of(resolve, ty)),
    };
    match function.kind {
        FunctionKind::Constructor(_) => format!("constructor({})", params.join(", ")),
        _ => format!(
            "{}: func({}){result}",
            function.item_name(),
            params.join(", ")
        ),
    }
}

fn type_name_of(resolve: &Resolve, ty: &Type) -> String {
    let id = match ty {
        Type::Id(id) => *id,
        Type::Bool => return "bool".into(),
        Type::U8 => return "u8".into(),
        Type::U16 => return "u16".into(),
        Type::U32 => return "u32".into(),
        Type::U64 => return "u64".into(),
        Type::S8 => return "s8".into(),
        Type::S16 => return "s16".into(),
        Type::S32 => return "s32".into(),
        Type::S64 => return "s64".into(),
        Type::F32 => return "f32".into(),
        Type::F64 => return "f64".into(),
        Type::Char => return "char".into(),
        Type::String => return "string".into(),
        Type::ErrorContext => return "error-context".into(),
    };
    let def = &resolve.types[id];
    if let Some(name) = &def.name {
        return name.clone();
    }
    let name = |ty: &Type| type_name_of(resolve, ty);
    match &def.kind {
        TypeDefKind::Option(t) => format!("option<{}>", name(t)),
        TypeDefKind::List(t) => format!("list<{}>", name(t)),
        TypeDefKind::Tuple(t) => format!(
            "tuple<{}>",
            t.types.iter().map(name).collect::<Vec<_>>().join(", ")
        ),
        TypeDefKind::Result(r) => match (&r.ok, &r.err) {
            (Some(ok), Some(err)) => format!("result<{}, {}>", name(ok), name(err)),
            (Some(ok), None) => format!("result<{}>", name(ok)),
            (None, Some(err)) => format!("result<_, {}>", name(err)),
            (None, None) => "result".into(),
        },
        TypeDefKind::Handle(Handle::Own(id)) => name(&Type::Id(*id)),
        TypeDefKind::Handle(Handle::Borrow(id)) => format!("borrow<{}>", name(&Type::Id(*id))),
        TypeDefKind::Type(t) => name(t),
        other => format!("{other:?}"),
    }
}

/// Documentation as an indented paragraph (nothing when there is none).
fn paragraph(out: &mut String, docs: &Docs, indent: &str) {
    let Some(text) = &docs.contents else {
        return;
    };
    for line in text.trim().lines() {
        let _ = writeln!(out, "{indent}{}", line.trim_end());
    }
}
