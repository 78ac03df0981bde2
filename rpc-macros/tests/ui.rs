//! The `#[service]` macro's UI tests: the cases in `ui/pass` compile, each case in `ui/fail` fails with the
//! diagnostic in its `.stderr` file. `TRYBUILD=overwrite` regenerates the `.stderr` files.

#[test]
fn macro_ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("ui/pass/*.rs");
    cases.compile_fail("ui/fail/*.rs");
}
