//! `sqlx::migrate!` embeds the migration files at compile time but cannot tell cargo about
//! them on stable Rust: without this, a new or changed migration would not rebuild the crate.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
