import ArgumentParser
import Dispatch
import Foundation
import ThinFS

/// `thinfs bench`: pool figures beside a baseline measured in the same run,
/// the raw file accessed with pread/pwrite on the same file system.
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure the userspace pool against a raw file (pread/pwrite), side by side in one run.",
        discussion: """
        Workloads: sequential write and read of a thin device (1M requests); random 4K reads and writes on \
        mapped, unshared blocks with atomicCommit on and off; first writes into fresh blocks; copy-on-write \
        writes into blocks shared with a snapshot; create_snap on devices with 1G and 100G mapped; delete of a \
        10G device; commit latency; crc32c in hardware and software.

        Nothing is dropped from the page cache. Goals are printed with PASS or MISS beside the figures; \
        the command exits 0 either way. See docs/benchmarks.md.
        """)

    @Option(help: "Where to make the scratch directory. A new thinfs-bench.XXXXXX directory is made inside it and removed at the end, also on error or SIGINT/SIGTERM.")
    var dir = "/var/tmp"

    @Option(help: "Sequential test size: a multiple of 1M, at least 16M (default 1G, or 64M with --quick).")
    var size: Size?

    @Flag(help: "Small sizes, for CI smoke runs (well under 30 s).")
    var quick = false

    @Flag(help: "Print the results as JSON.")
    var json = false

    @Option(help: "Seed of the generator of random offsets.")
    var seed: UInt64 = 0x7468_696E_6673   // "thinfs"

    @Flag(name: .shortAndLong, help: "Log at debug level to stderr.")
    var verbose = false

    func validate() throws {
        if let size, size.bytes < 16 << 20 || size.bytes % (1 << 20) != 0 {
            throw ValidationError("--size must be a multiple of 1M and at least 16M, e.g. --size 1G")
        }
    }

    func run() throws {
        Logging.bootstrapOnce(verbose: verbose)
        let config = BenchSuite.configuration(quick: quick, sequential: size?.bytes, seed: seed)
        let scratch = try ScratchDirectory(parent: dir)
        let handlers = Self.removeOnSignal(scratch)
        defer {
            for (signal, source) in handlers {
                source.cancel()
                Foundation.signal(signal, SIG_DFL)
            }
            Self.progress("removing \(scratch.path)")
            scratch.remove()
        }
        let needed = BenchSuite.diskNeeded(config)
        if let available = MachineInfo.availableBytes(at: scratch.path), available < needed {
            throw BenchError.noSpace(dir: dir, needed: needed, available: available)
        }
        let suite = BenchSuite(scratch: scratch, config: config, progress: Self.progress)
        let report = try suite.run()
        print(json ? try report.json() : report.text(), terminator: json ? "\n" : "")
    }

    /// Progress goes to stderr, so that stdout holds only the report.
    private static func progress(_ line: String) {
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    /// Removes the scratch directory on SIGINT or SIGTERM, then exits as the
    /// signal would have. Dispatch runs the handler on a queue, outside signal
    /// context, so it may call into Foundation.
    private static func removeOnSignal(_ scratch: ScratchDirectory) -> [(Int32, DispatchSourceSignal)] {
        [SIGINT, SIGTERM].map { sig in
            Foundation.signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler {
                scratch.remove()
                FileHandle.standardError.write(Data("thinfs bench: interrupted; removed \(scratch.path)\n".utf8))
                Foundation.exit(128 + sig)
            }
            source.resume()
            return (sig, source)
        }
    }
}
