"""Code the tests share: namespaces, fakes, the conformance loader, CLI and apply helpers. No tests."""
