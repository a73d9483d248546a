import Foundation
import TestSupport
import Testing

/// `thinfs layer apply-diff ID -` spools stdin to a file under `ROOT/tmp` (the request may run in the
/// daemon, which cannot read the command's stdin). A command killed while it spools must not leave
/// that file behind for ever: the next open of the store removes it, as it removes a killed import's
/// unpack directory.
@Suite("Spooled stdin of a killed command", .serialized,
       .enabled(if: Binaries.available && Oracle.available, "needs the built binaries and thin-provisioning-tools"))
struct SpoolCleanupTests {
    /// Every regular file under `dir`, with its size.
    static func files(under dir: String) -> [String: Int] {
        var found: [String: Int] = [:]
        guard let walk = FileManager.default.enumerator(atPath: dir) else { return found }
        while let name = walk.nextObject() as? String {
            let attrs = try? FileManager.default.attributesOfItem(atPath: dir + "/" + name)
            if attrs?[.type] as? FileAttributeType == .typeRegular { found[name] = (attrs?[.size] as? Int) ?? 0 }
        }
        return found
    }

    @Test func killedApplyDiffFromStdinLeavesNoSpool() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        try f.ok(["layer", "create", "img"])
        let scratch = f.root + "/tmp"
        #expect(Self.files(under: scratch).isEmpty)

        let process = Process()
        process.executableURL = URL(fileURLWithPath: Binaries.path("thinfs"))
        process.arguments = ["layer", "apply-diff", "img", "-", "--root", f.root]
        let stdin = Pipe()
        process.standardInput = stdin
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Part of a tar (more than the 1 MiB the command reads at a time), and stdin left open: the command is still spooling when it is killed.
        try stdin.fileHandleForWriting.write(contentsOf: Data(repeating: 0x61, count: 3 << 20))
        let spooling = eventually(20) { Self.files(under: scratch).values.contains { $0 >= 1 << 20 } }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        try? stdin.fileHandleForWriting.close()
        try #require(spooling, "the command never spooled its stdin under \(scratch): \(Self.files(under: scratch))")

        // Any command that opens the store cleans up after the killed one.
        try f.ok(["layer", "ls"])
        #expect(Self.files(under: scratch).isEmpty, "left under ROOT/tmp: \(Self.files(under: scratch))")
        // The layer the killed command was writing into is unchanged and usable.
        #expect(try f.layerState("img") == "active")
        try f.ok(["layer", "rm", "img"])
        try f.expectNoLeaks()
    }
}
