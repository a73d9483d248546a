import Foundation
import Synchronization
import Testing

/// thin-provisioning-tools, the external oracle for the metadata format.
public enum Oracle {
    public static var available: Bool { FileManager.default.isExecutableFile(atPath: "/usr/sbin/thin_check") }

    public struct Result: Sendable {
        public var status: Int32
        public var stdout: String
        public var stderr: String
        public init(status: Int32, stdout: String, stderr: String) {
            self.status = status
            self.stdout = stdout
            self.stderr = stderr
        }
    }

    public static func run(_ tool: String, _ args: [String]) throws -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool.hasPrefix("/") ? tool : "/usr/sbin/\(tool)")
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        // Drain stderr on another thread: a tool that fills the stderr pipe
        // (thin_check on badly damaged metadata) would otherwise block forever
        // while we wait for the end of stdout.
        let errData = Mutex(Data())
        let drained = DispatchSemaphore(value: 0)
        let errHandle = err.fileHandleForReading
        Thread.detachNewThread {
            let e = errHandle.readDataToEndOfFile()
            errData.withLock { $0 = e }
            drained.signal()
        }
        let o = out.fileHandleForReading.readDataToEndOfFile()
        drained.wait()
        let e = errData.withLock { $0 }
        p.waitUntilExit()
        return Result(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
    }

    /// Runs thin_check and records its complaint as a test issue.
    @discardableResult
    public static func check(_ path: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> Bool {
        let r = try run("thin_check", [path])
        #expect(r.status == 0, "thin_check \(path) failed:\n\(r.stdout)\(r.stderr)", sourceLocation: sourceLocation)
        return r.status == 0
    }

    public static func dump(_ path: String, metadataSnap: Bool = false) throws -> String {
        let r = try run("thin_dump", (metadataSnap ? ["-m"] : []) + [path])
        guard r.status == 0 else { throw OracleError.failed("thin_dump \(path): \(r.stderr)") }
        return r.stdout
    }

    public static func restore(xml: String, to path: String) throws {
        let xmlPath = path + ".xml"
        try xml.write(toFile: xmlPath, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: xmlPath) }
        let r = try run("thin_restore", ["-i", xmlPath, "-o", path])
        guard r.status == 0 else { throw OracleError.failed("thin_restore: \(r.stderr)") }
    }

    public enum OracleError: Error { case failed(String) }
}

/// A scratch directory removed at the end of a test.
public final class TempDir {
    public let path: String
    public init() {
        path = NSTemporaryDirectory() + "thinfs-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    public func file(_ name: String, size: UInt64) -> String {
        let p = path + "/" + name
        _ = FileManager.default.createFile(atPath: p, contents: nil)
        let h = FileHandle(forWritingAtPath: p)!
        try! h.truncate(atOffset: size)
        try! h.close()
        return p
    }
}

import Logging

/// A logger that keeps test output to warnings and errors.
public let quietLogger: Logger = {
    var l = Logger(label: "thinfs.test", factory: { StreamLogHandler.standardError(label: $0) })
    l.logLevel = .warning
    return l
}()
