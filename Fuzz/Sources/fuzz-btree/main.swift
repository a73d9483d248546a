import FuzzSupport

// The btree harness (Fuzz/README.md): see MetadataInput.btree.
// SwiftPM links `main` to this symbol (see Harness.main); the package is built with
// -parse-as-library, so there is no top-level code.
@_cdecl("fuzz_btree_main")
func entry(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> CInt {
    Harness.main(seeds: { MetadataInput.seeds("btree") }, setup: { _ = ReferencePool.shared }) { data in
        MetadataExercise.run(MetadataInput.btree(data))
    }
}
