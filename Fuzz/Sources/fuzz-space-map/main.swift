import FuzzSupport

// The space-map harness (Fuzz/README.md): see MetadataInput.spaceMap.
// SwiftPM links `main` to this symbol (see Harness.main); the package is built with
// -parse-as-library, so there is no top-level code.
@_cdecl("fuzz_space_map_main")
func entry(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> CInt {
    Harness.main(seeds: { MetadataInput.seeds("space-map") }, setup: { _ = ReferencePool.shared }) { data in
        MetadataExercise.run(MetadataInput.spaceMap(data))
    }
}
