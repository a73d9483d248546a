import Foundation
import TestSupport
import Testing
@testable import ThinFSCommands

/// `thinfs compare` refuses bad input with an error naming the argument at fault, before it makes
/// anything: no output directory, no scratch directory, no engine run.
struct CompareCommandTests {
    static let catalog = CompareEngine.Catalog(setups: ["thinfs", "overlayfs"], workloads: ["seq-read", "untar"])

    /// A request over a real OCI-layout-looking image directory in dir, with overrides.
    func request(_ dir: TempDir, image: String? = nil, setups: String? = nil, workloads: String? = nil, reps: Int? = nil,
                 output: String? = nil, force: Bool = false, baseline: String? = nil) throws -> CompareRequest {
        let img = dir.path + "/img"
        try FileManager.default.createDirectory(atPath: img, withIntermediateDirectories: true)
        return try CompareRequest(image: image ?? img, setups: setups, workloads: workloads, reps: reps,
                                  output: output ?? dir.path + "/out", force: force, baseline: baseline,
                                  scratchParent: dir.path, catalog: Self.catalog)
    }

    @Test func aGoodRequestBecomesTheEngineArgumentsAndMakesNothing() throws {
        let dir = TempDir()
        let r = try request(dir, setups: "overlayfs, thinfs,overlayfs", workloads: "untar", reps: 3)
        #expect(r.setups == ["overlayfs", "thinfs"])   // trimmed, duplicates dropped, order kept
        let args = r.engineArguments(quick: true, thinfs: "/x/thinfs", commandLine: "thinfs compare")
        #expect(args.starts(with: ["run", "--image", dir.path + "/img", "--output", dir.path + "/out"]))
        #expect(args.contains("--quick") && args.contains("overlayfs,thinfs") && args.contains("untar"))
        #expect(args[args.firstIndex(of: "--reps")! + 1] == "3")
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/out"))
    }

    @Test func aMissingImageIsNamed() throws {
        let dir = TempDir()
        #expect(throws: CompareError.imageMissing(path: dir.path + "/nope")) {
            try request(dir, image: dir.path + "/nope")
        }
    }

    @Test func anImageFileThatIsNotATarIsRefused() throws {
        let dir = TempDir()
        let f = dir.file("image.txt", size: 4096)
        #expect(throws: CompareError.imageUnrecognized(path: f)) { try request(dir, image: f) }
    }

    @Test func unknownSetupsAndWorkloadsAreNamedWithTheKnownOnes() throws {
        let dir = TempDir()
        #expect(throws: CompareError.unknownSetup(name: "zfs", known: Self.catalog.setups)) {
            try request(dir, setups: "thinfs,zfs")
        }
        #expect(throws: CompareError.unknownWorkload(name: "seq-reed", known: Self.catalog.workloads)) {
            try request(dir, workloads: "seq-reed")
        }
        #expect(throws: CompareError.emptyList(option: "--setups")) { try request(dir, setups: " , ") }
        #expect(throws: CompareError.badReps(0)) { try request(dir, reps: 0) }
    }

    @Test func aNonEmptyOutputDirectoryNeedsForce() throws {
        let dir = TempDir()
        let out = dir.path + "/out"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        try Data("keep".utf8).write(to: URL(fileURLWithPath: out + "/mine.txt"))
        #expect(throws: CompareError.outputNotEmpty(path: out)) { try request(dir, output: out) }
        #expect(try request(dir, output: out, force: true).output == out)
        #expect(try String(contentsOfFile: out + "/mine.txt", encoding: .utf8) == "keep")
        let file = dir.file("a-file", size: 1)
        #expect(throws: CompareError.outputNotDirectory(path: file)) { try request(dir, output: file, force: true) }
    }

    @Test func aBaselineMustBeAnEarlierResultsFile() throws {
        let dir = TempDir()
        let bad = dir.path + "/bad.json"
        try Data("{\"runs\": []}".utf8).write(to: URL(fileURLWithPath: bad))
        #expect(throws: CompareError.baselineUnreadable(
            path: bad, reason: "not a thinfs compare results.json (no schema and summary)")) {
            try request(dir, baseline: bad)
        }
        let good = dir.path + "/results.json"
        try Data("{\"schema\": 1, \"summary\": {}}".utf8).write(to: URL(fileURLWithPath: good))
        #expect(try request(dir, baseline: good).baseline == good)
    }

    /// The engine's own list of setups and workloads, which the command checks names against.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/python3")))
    func theEngineListsEverySetupAndWorkloadOfTheIssue() throws {
        let catalog = try CompareEngine.locate().catalog()
        #expect(catalog.setups == ["thinfs", "thinfs-kernel", "overlayfs", "fuse-overlayfs", "containerd-overlayfs", "containerd-thinfs"])
        for w in ["seq-read", "seq-write", "rand-read", "rand-write", "untar", "create", "stat-cold", "stat-warm",
                  "read-cold", "read-warm", "cow-first", "cow-later", "start", "space", "memory"] {
            #expect(catalog.workloads.contains(w), "\(w)")
        }
    }

    /// Through the built binary: each bad input exits non-zero with its message on stderr, and
    /// leaves the scratch parent empty and the output directory as it was.
    @Test(.enabled(if: CLI.available && FileManager.default.isExecutableFile(atPath: "/usr/bin/python3")),
          arguments: [
              // (extra arguments, what stderr must name); IMG, OUT, FULL stand for paths in the test's directory
              (["--image", "IMG/missing"], "--image IMG/missing: no such file or directory"),
              (["--image", "IMG", "--setups", "thinfs,btrfs"], "unknown setup 'btrfs'"),
              (["--image", "IMG", "--workloads", "untar,fsck"], "unknown workload 'fsck'"),
              (["--image", "IMG", "--output", "FULL"], "the directory is not empty"),
          ])
    func badInputThroughTheBinaryLeavesNothing(extra: [String], message: String) throws {
        let dir = TempDir()
        let img = dir.path + "/img", scratch = dir.path + "/scratch", full = dir.path + "/full"
        for d in [img, scratch, full] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        try Data("x".utf8).write(to: URL(fileURLWithPath: full + "/earlier-report.md"))
        let sub = { (s: String) in
            s.replacingOccurrences(of: "IMG", with: img).replacingOccurrences(of: "FULL", with: full)
        }
        var args = ["compare", "--dir", scratch] + extra.map(sub)
        if !extra.contains("--output") { args += ["--output", dir.path + "/out"] }
        let r = try CLI.run(args)
        #expect(r.status != 0)
        #expect(r.stderr.contains(sub(message)), "\(r.stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: scratch).isEmpty)
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/out"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: full) == ["earlier-report.md"])
    }
}
