import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `thinfs compare`: ThinFS against overlayfs and fuse-overlayfs, set up from one image, the same
/// workloads side by side, and a report with plots.
///
/// This command is the front door: it checks every argument and refuses bad input before anything
/// is made, then replaces itself (execv) with the engine, `scripts/compare/compare.py` under Debian's
/// python3. The engine holds the one implementation of each workload (the shell scripts beside it
/// call it too), and the plots need matplotlib, which is Python; being exec'd, it receives Ctrl-C and
/// SIGTERM itself and cleans up its mounts, daemons and scratch directory.
struct CompareCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compare",
        abstract: "Compare ThinFS with overlayfs and fuse-overlayfs on one image: workloads side by side, a report with plots.",
        discussion: """
        Every setup is built from the image's layers plus a workload layer that compare makes (a tree of \
        small files and one large file). Setups: thinfs (FUSE on the userspace pool), thinfs-kernel (where \
        a kernel pool exists), overlayfs, fuse-overlayfs, and containerd-overlayfs and containerd-thinfs (one \
        private containerd, its overlayfs snapshotter and thinfs serve as its proxy snapshotter, containers by \
        ctr run); one the host cannot run is skipped with the reason in the report. Workloads: fio sequential \
        and random reads and writes, untar, file creation, stat and read of a tree cold and warm, the first \
        write into a large image file, image unpack, container start, disk space and page cache of N \
        containers. The setups are interleaved round by round; the report gives the median, the range and \
        the ratio to overlayfs (containerd-thinfs: to containerd-overlayfs).

        Output: DIR/report.md, DIR/report.html (self-contained), DIR/*.png (matplotlib) and \
        DIR/results.json (every raw figure; pass it to --baseline of a later run for a before/after column). \
        Needs root. See docs/benchmarks.md.
        """)

    @Option(help: "The image: an OCI image layout, a `docker save` archive, or a directory (one layer).")
    var image: String

    @Option(help: "Comma-separated setups (default: every setup; the ones this host cannot run are skipped with the reason).")
    var setups: String?

    @Option(help: "Comma-separated workloads (default: all).")
    var workloads: String?

    @Option(help: "Rounds of every measurement (default 5, or 1 with --quick).")
    var reps: Int?

    @Flag(help: "Small sizes, for CI: about a minute on an idle machine.")
    var quick = false

    @Option(help: "The results.json of an earlier run: the report adds a before/after column.")
    var baseline: String?

    @Flag(help: "Write into an output directory that is not empty.")
    var force = false

    @Option(help: "The directory for the report; made if missing, and refused if not empty (without --force).")
    var output: String

    @Option(help: "Where to make the scratch directory (removed at the end, also on Ctrl-C or SIGTERM).")
    var dir = "/var/tmp"

    func run() throws {
        let engine = try CompareEngine.locate()
        let catalog = try engine.catalog()
        let request = try CompareRequest(
            image: image, setups: setups, workloads: workloads, reps: reps, output: output, force: force,
            baseline: baseline, scratchParent: dir, catalog: catalog)
        guard geteuid() == 0 else { throw CompareError.notRoot }
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        let line = (["thinfs"] + CommandLine.arguments.dropFirst()).map(Self.shellQuoted).joined(separator: " ")
        try engine.exec(request.engineArguments(quick: quick, thinfs: exe, commandLine: line))
    }

    static func shellQuoted(_ s: String) -> String {
        if !s.isEmpty, s.allSatisfy({ $0.isLetter || $0.isNumber || "-_./=,:@".contains($0) }) { return s }
        return "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }
}

/// Why `thinfs compare` refused to start. Each names the argument or path at fault and the remedy.
enum CompareError: Error, Equatable, CustomStringConvertible {
    case imageMissing(path: String)
    case imageUnrecognized(path: String)
    case unknownSetup(name: String, known: [String])
    case unknownWorkload(name: String, known: [String])
    case emptyList(option: String)
    case badReps(Int)
    case outputNotDirectory(path: String)
    case outputNotEmpty(path: String)
    case scratchMissing(path: String)
    case baselineUnreadable(path: String, reason: String)
    case engineMissing(tried: [String])
    case pythonMissing(path: String)
    case catalogUnreadable(engine: String, reason: String)
    case execFailed(python: String, errno: Int32)
    case notRoot

    var description: String {
        switch self {
        case .imageMissing(let path):
            "--image \(path): no such file or directory"
        case .imageUnrecognized(let path):
            "--image \(path): neither a directory (an OCI image layout, or one layer's files) nor a tar file (a `docker save` archive)"
        case .unknownSetup(let name, let known):
            "--setups: unknown setup '\(name)' (known: \(known.joined(separator: ", ")))"
        case .unknownWorkload(let name, let known):
            "--workloads: unknown workload '\(name)' (known: \(known.joined(separator: ", ")))"
        case .emptyList(let option):
            "\(option): the list is empty; name at least one, comma-separated"
        case .badReps(let n):
            "--reps \(n): give a number of rounds from 1 to 100"
        case .outputNotDirectory(let path):
            "--output \(path): exists and is not a directory"
        case .outputNotEmpty(let path):
            "--output \(path): the directory is not empty; choose a new one, or pass --force to write into it"
        case .scratchMissing(let path):
            "--dir \(path): no such directory (the scratch directory is made inside it)"
        case .baselineUnreadable(let path, let reason):
            "--baseline \(path): \(reason); give the results.json of an earlier thinfs compare run"
        case .engineMissing(let tried):
            "the compare engine (compare.py) is not installed; looked at: \(tried.joined(separator: ", ")) (set THINFS_COMPARE_ENGINE)"
        case .pythonMissing(let path):
            "\(path) is missing: thinfs compare runs under Debian's python3 with python3-matplotlib (apt-get install python3-matplotlib; or set THINFS_PYTHON)"
        case .catalogUnreadable(let engine, let reason):
            "\(engine) --list failed: \(reason)"
        case .execFailed(let python, let errno):
            "cannot run \(python): \(String(cString: strerror(errno)))"
        case .notRoot:
            "thinfs compare needs root (mounts, drop_caches, memory cgroups)"
        }
    }
}

/// The engine: where compare.py is, and the python3 that runs it.
struct CompareEngine {
    var script: String
    var python: String

    /// The setups, workloads and plots the engine knows (`compare.py --list`).
    struct Catalog: Decodable, Equatable {
        var setups: [String]
        var workloads: [String]
    }

    /// THINFS_COMPARE_ENGINE, then share/thinfs/compare.py beside an installed binary, then the
    /// checkout this binary was built from.
    static func locate(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> CompareEngine {
        let exeDir = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        let checkout = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        var tried = [String]()
        if let e = environment["THINFS_COMPARE_ENGINE"] { tried.append(e) }
        tried.append(exeDir.appendingPathComponent("../share/thinfs/compare.py").standardized.path)
        tried.append(checkout.appendingPathComponent("scripts/compare/compare.py").path)
        guard let script = tried.first(where: { FileManager.default.isReadableFile(atPath: $0) }) else {
            throw CompareError.engineMissing(tried: tried)
        }
        // Debian's python3: python3-matplotlib is installed for it, not for a python3 earlier on PATH.
        let python = environment["THINFS_PYTHON"] ?? "/usr/bin/python3"
        guard FileManager.default.isExecutableFile(atPath: python) else { throw CompareError.pythonMissing(path: python) }
        return CompareEngine(script: script, python: python)
    }

    func catalog() throws -> Catalog {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = [script, "--list"]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        do { try p.run() } catch { throw CompareError.catalogUnreadable(engine: script, reason: "\(error)") }
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw CompareError.catalogUnreadable(engine: script, reason: "exit \(p.terminationStatus): \(String(decoding: e, as: UTF8.self))")
        }
        do { return try JSONDecoder().decode(Catalog.self, from: o) } catch {
            throw CompareError.catalogUnreadable(engine: script, reason: "not the expected JSON: \(error)")
        }
    }

    /// Replaces this process with the engine; returns only by throwing.
    func exec(_ arguments: [String]) throws -> Never {
        fflush(nil)   // every C stream: nothing buffered is lost by the exec
        let argv = [python, script] + arguments
        var cargs = argv.map { strdup($0) } + [nil]
        execv(python, &cargs)
        let e = errno
        for p in cargs { free(p) }
        throw CompareError.execFailed(python: python, errno: e)
    }
}

/// The checked arguments of one run. Making one touches nothing on disk: bad input is refused
/// before any directory, mount or process exists.
struct CompareRequest: Equatable {
    var image: String
    var setups: [String]?
    var workloads: [String]?
    var reps: Int?
    var output: String
    var baseline: String?
    var scratchParent: String

    init(image: String, setups: String?, workloads: String?, reps: Int?, output: String, force: Bool,
         baseline: String?, scratchParent: String, catalog: CompareEngine.Catalog) throws {
        let fm = FileManager.default
        var isDir: ObjCBool = false
        let imagePath = URL(fileURLWithPath: image).standardized.path
        guard fm.fileExists(atPath: imagePath, isDirectory: &isDir) else { throw CompareError.imageMissing(path: image) }
        if !isDir.boolValue, !Self.isTar(imagePath) { throw CompareError.imageUnrecognized(path: image) }
        self.image = imagePath

        self.setups = try setups.map { try Self.list($0, option: "--setups", known: catalog.setups, unknown: CompareError.unknownSetup) }
        self.workloads = try workloads.map {
            try Self.list($0, option: "--workloads", known: catalog.workloads, unknown: CompareError.unknownWorkload)
        }
        if let reps, !(1...100).contains(reps) { throw CompareError.badReps(reps) }
        self.reps = reps

        let out = URL(fileURLWithPath: output).standardized.path
        if fm.fileExists(atPath: out, isDirectory: &isDir) {
            guard isDir.boolValue else { throw CompareError.outputNotDirectory(path: output) }
            let entries = (try? fm.contentsOfDirectory(atPath: out)) ?? []
            if !entries.isEmpty, !force { throw CompareError.outputNotEmpty(path: output) }
        }
        self.output = out

        guard fm.fileExists(atPath: scratchParent, isDirectory: &isDir), isDir.boolValue else {
            throw CompareError.scratchMissing(path: scratchParent)
        }
        self.scratchParent = scratchParent

        if let baseline {
            guard let data = fm.contents(atPath: baseline) else {
                throw CompareError.baselineUnreadable(path: baseline, reason: "cannot be read")
            }
            guard let doc = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
                  doc["schema"] != nil, doc["summary"] is [String: Any] else {
                throw CompareError.baselineUnreadable(path: baseline, reason: "not a thinfs compare results.json (no schema and summary)")
            }
            self.baseline = URL(fileURLWithPath: baseline).standardized.path
        } else {
            self.baseline = nil
        }
    }

    /// Comma-separated names, each known; duplicates dropped, order kept.
    private static func list(_ text: String, option: String, known: [String],
                             unknown: (String, [String]) -> CompareError) throws -> [String] {
        var names = [String]()
        for part in text.split(separator: ",") {
            let name = part.trimmingCharacters(in: .whitespaces)
            if name.isEmpty { continue }
            guard known.contains(name) else { throw unknown(name, known) }
            if !names.contains(name) { names.append(name) }
        }
        if names.isEmpty { throw CompareError.emptyList(option: option) }
        return names
    }

    /// A tar file has "ustar" at offset 257 (POSIX and GNU formats alike).
    private static func isTar(_ path: String) -> Bool {
        guard let h = FileHandle(forReadingAtPath: path) else { return false }
        defer { try? h.close() }
        guard let head = try? h.read(upToCount: 262), head.count == 262 else { return false }
        return head[257..<262].elementsEqual("ustar".utf8)
    }

    func engineArguments(quick: Bool, thinfs: String, commandLine: String) -> [String] {
        var a = ["run", "--image", image, "--output", output, "--dir", scratchParent, "--thinfs", thinfs,
                 "--command-line", commandLine]
        if let setups { a += ["--setups", setups.joined(separator: ",")] }
        if let workloads { a += ["--workloads", workloads.joined(separator: ",")] }
        if let reps { a += ["--reps", String(reps)] }
        if quick { a.append("--quick") }
        if let baseline { a += ["--baseline", baseline] }
        return a
    }
}
