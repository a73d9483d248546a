import Foundation

/// Runs a program to completion (harness setup and oracles only), its output kept.
public func runProgram(_ path: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = arguments
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    p.standardInput = FileHandle.nullDevice
    try p.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// The first of `names` found in the usual sbin and bin directories.
public func findProgram(_ names: String...) -> String? {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        for name in names where FileManager.default.isExecutableFile(atPath: dir + "/" + name) { return dir + "/" + name }
    }
    return nil
}
