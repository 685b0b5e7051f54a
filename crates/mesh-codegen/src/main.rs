//! `mesh-codegen [--check] [--root DIR]`: what `cargo xtask codegen` runs.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut check = false;
    let mut root = mesh_codegen::workspace_root();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--root" => match args.next() {
                Some(dir) => root = PathBuf::from(dir),
                None => {
                    eprintln!("error: --root needs a directory");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("error: unexpected argument {other:?}; usage: mesh-codegen [--check] [--root DIR]");
                return ExitCode::from(2);
            }
        }
    }
    let files = match mesh_codegen::generate(&root) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if check {
        let stale = mesh_codegen::stale(&root, &files);
        if stale.is_empty() {
            println!("generated code is up to date ({} files)", files.len());
            return ExitCode::SUCCESS;
        }
        for path in &stale {
            eprintln!("stale: {}", path.display());
        }
        eprintln!("error: checked-in generated code is stale; run `cargo xtask codegen`");
        return ExitCode::FAILURE;
    }
    if let Err(e) = mesh_codegen::write(&root, &files) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    for file in &files {
        println!("wrote {}", file.path.display());
    }
    ExitCode::SUCCESS
}
