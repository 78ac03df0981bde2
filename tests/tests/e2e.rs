//! End-to-end tests: the scenario suite over every transport, and the macro's UI tests.

mqrpc_tests::scenario_suite!(embedded, mqrpc_tests::EmbeddedHarness::new());
mqrpc_tests::scenario_suite!(own_broker, mqrpc_tests::RemoteHarness::start().await);

#[test]
fn macro_ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("ui/pass/*.rs");
    cases.compile_fail("ui/fail/*.rs");
}
