//! `gpuwasm new TEMPLATE NAME`: a handler project from a template built
//! into the binary (`templates/` in the repository), with its gpuwasm.toml.

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
#[command(after_help = "Example:\n  gpuwasm new js hello && gpuwasm build hello && gpuwasm run hello")]
pub struct NewArgs {
    /// The language of the handler.
    template: Template,
    /// The handler's name (also its deployment name): 1-63 of a-z, 0-9 and
    /// `-`, starting with a letter.
    name: String,
    /// The folder to create [default: NAME].
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Template {
    /// Rust on the guest SDK (cargo, target wasm32-wasip2).
    Rust,
    /// JavaScript, built by componentize-js (npm, through npx).
    Js,
    /// Python, built by componentize-py (PyPI, into the project's .venv).
    Python,
    /// JavaScript calling a model: OpenAI-compatible embeddings through
    /// wasi-nn (serves MiniLM as `minilm`).
    JsEmbeddings,
}

/// A file of a template: its path in the project and its text.
type File = (&'static str, &'static str);

macro_rules! repo_file {
    ($path:literal) => {
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../", $path))
    };
}

const RUST: &[File] = &[
    ("Cargo.toml", repo_file!("templates/rust/Cargo.toml")),
    ("src/lib.rs", repo_file!("templates/rust/src/lib.rs")),
    ("gpuwasm.toml", repo_file!("templates/rust/gpuwasm.toml")),
    (".gitignore", repo_file!("templates/rust/gitignore")),
    // The guest SDK and the WIT it binds, carried by the project.
    (".gpuwasm/guest-sdk/Cargo.toml", repo_file!("guest-sdk/Cargo.toml")),
    (".gpuwasm/guest-sdk/src/lib.rs", repo_file!("guest-sdk/src/lib.rs")),
    (".gpuwasm/guest-sdk/src/nn.rs", repo_file!("guest-sdk/src/nn.rs")),
    (".gpuwasm/guest-sdk/src/llm.rs", repo_file!("guest-sdk/src/llm.rs")),
    (".gpuwasm/wit/init.wit", repo_file!("wit/init.wit")),
    (".gpuwasm/wit/deps/io.wit", repo_file!("wit/deps/io.wit")),
    (".gpuwasm/wit/deps/nn.wit", repo_file!("wit/deps/nn.wit")),
    (".gpuwasm/wit/deps/llm.wit", repo_file!("wit/deps/llm.wit")),
];

const JS: &[File] = &[
    ("handler.js", repo_file!("templates/js/handler.js")),
    ("gpuwasm.toml", repo_file!("templates/js/gpuwasm.toml")),
    (".gitignore", repo_file!("templates/js/gitignore")),
];

const JS_EMBEDDINGS: &[File] = &[
    ("handler.js", repo_file!("templates/js-embeddings/handler.js")),
    ("gpuwasm.toml", repo_file!("templates/js-embeddings/gpuwasm.toml")),
    (".gitignore", repo_file!("templates/js-embeddings/gitignore")),
];

const PYTHON: &[File] = &[
    ("app.py", repo_file!("templates/python/app.py")),
    ("gpuwasm.toml", repo_file!("templates/python/gpuwasm.toml")),
    (".gitignore", repo_file!("templates/python/gitignore")),
];

/// The packages JS and Python worlds import: what `wasi:http/proxy` needs,
/// and wasi-nn.
const WASI: &[File] = &[
    ("nn.wit", repo_file!("wit/deps/nn.wit")),
    ("cli.wit", repo_file!("wit/deps/cli.wit")),
    ("clocks.wit", repo_file!("wit/deps/clocks.wit")),
    ("filesystem.wit", repo_file!("wit/deps/filesystem.wit")),
    ("http.wit", repo_file!("wit/deps/http.wit")),
    ("io.wit", repo_file!("wit/deps/io.wit")),
    ("random.wit", repo_file!("wit/deps/random.wit")),
    ("sockets.wit", repo_file!("wit/deps/sockets.wit")),
];

/// The wasi-nn interfaces JS and Python worlds import (wit/world.wit).
const NN_IMPORTS: &str = "  import wasi:nn/graph@0.2.0-rc-2024-10-28;
  import wasi:nn/inference@0.2.0-rc-2024-10-28;
  import wasi:nn/tensor@0.2.0-rc-2024-10-28;
  import wasi:nn/errors@0.2.0-rc-2024-10-28;
";

/// The WASI version the WIT files here are written at.
const WASI_VERSION: &str = "0.2.12";

impl Template {
    fn files(self) -> &'static [File] {
        match self {
            Template::Rust => RUST,
            Template::Js => JS,
            Template::Python => PYTHON,
            Template::JsEmbeddings => JS_EMBEDDINGS,
        }
    }

    /// The WASI version its world is given at: StarlingMonkey (JS)
    /// implements 0.2.10; the runtime serves 0.2.0 to 0.2.12 alike.
    fn wasi_version(self) -> Option<&'static str> {
        match self {
            Template::Rust => None,
            Template::Js | Template::JsEmbeddings => Some("0.2.10"),
            Template::Python => Some(WASI_VERSION),
        }
    }

    fn next_steps(self, dir: &Path) -> String {
        let d = dir.display();
        let tool = match self {
            Template::Rust => "cargo and the wasm32-wasip2 target (rustup target add wasm32-wasip2)",
            Template::Js | Template::JsEmbeddings => "node and npx (componentize-js is fetched on the first build)",
            Template::Python => "python3 with venv (componentize-py is installed into .venv on the first build)",
        };
        let run = match self {
            Template::JsEmbeddings => format!("gpuwasm run {d} --model minilm=MODEL_FOLDER   # serves it on 127.0.0.1:8080"),
            _ => format!("gpuwasm run {d}       # serves it on 127.0.0.1:8080"),
        };
        format!("next:\n  gpuwasm build {d}     # needs {tool}\n  {run}\n  gpuwasm deploy {d}    # to a server (GPUWASM_SERVER, GPUWASM_TOKEN)")
    }
}

pub fn run(args: NewArgs) -> Result<ExitCode> {
    if let Err(e) = gpuwasm_server::check_name("handler", &args.name) {
        bail!("{e}");
    }
    if !args.name.as_bytes()[0].is_ascii_lowercase() {
        bail!("a handler's name starts with a letter (it is also a package name), not {:?}", args.name);
    }
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} already exists and is not empty: choose another name or --dir", dir.display());
    }
    let crate_name = args.name.replace('-', "_");
    let fill = |text: &str| text.replace("{{name}}", &args.name).replace("{{crate}}", &crate_name);
    let mut written = Vec::new();
    for (path, text) in args.template.files() {
        let text = match *path {
            // The SDK is a member of the project's workspace, not one of its own.
            ".gpuwasm/guest-sdk/Cargo.toml" => {
                let member = text.replace("\n[workspace]\n", "\n");
                debug_assert_ne!(&member, text, "guest-sdk/Cargo.toml declares a [workspace] of its own");
                member
            }
            _ => fill(text),
        };
        written.push(write(&dir, path, &text)?);
    }
    if let Some(version) = args.template.wasi_version() {
        let world = format!(
            "package gpuwasm:handler;\n\n/// An HTTP handler that may call models through wasi-nn.\nworld handler {{\n  include wasi:http/proxy@{version};\n{NN_IMPORTS}}}\n"
        );
        written.push(write(&dir, "wit/world.wit", &world)?);
        for (name, text) in WASI {
            written.push(write(&dir, &format!("wit/deps/{name}"), &text.replace(WASI_VERSION, version))?);
        }
    }
    println!("created {} ({} files)", dir.display(), written.len());
    println!("{}", args.template.next_steps(&dir));
    Ok(ExitCode::SUCCESS)
}

fn write(dir: &Path, path: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
