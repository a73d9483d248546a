import Foundation
import ThinFS

/// containerd's filter syntax (package `filters`), for the fields its snapshot adaptor knows:
/// `name`, `parent`, `kind` and `labels.KEY`.
///
///     filter    := selector ("," selector)*        every selector must match
///     selector  := fieldpath [("==" | "!=" | "~=") value]   no operator: the field is present
///     fieldpath := field ("." field)*              a field is an identifier or a quoted string
///
/// Several filters in one List request match a snapshot when any of them does (ParseAll).
/// containerd's metadata store sends `parent==KEY` and label selectors such as
/// `labels."containerd.io/gc.root"` (quoted, since the label has dots and slashes).
public struct SnapshotFilter: Sendable {
    public enum Error: Swift.Error, CustomStringConvertible, Equatable {
        case syntax(filter: String, position: Int, reason: String)
        public var description: String {
            switch self {
            case .syntax(let filter, let position, let why): "filter \(filter.debugDescription) at \(position): \(why)"
            }
        }
    }

    enum Operator: Sendable { case present, equal, notEqual, matches }

    struct Selector: @unchecked Sendable {
        var path: [String]
        var op: Operator
        var value: String
        var regex: RE2Pattern?
    }

    /// Alternatives (OR) of conjunctions (AND).
    let alternatives: [[Selector]]

    public init(parsing filters: [String]) throws {
        alternatives = try filters.filter { !$0.isEmpty }.map(Self.parse)
    }

    public func matches(_ snapshot: LayerStore.Snapshot) -> Bool {
        alternatives.isEmpty || alternatives.contains { $0.allSatisfy { Self.matches($0, snapshot) } }
    }

    static func field(_ path: [String], _ s: LayerStore.Snapshot) -> String? {
        guard let first = path.first else { return nil }
        switch first {
        case "name": return path.count == 1 ? s.key : nil
        case "parent": return path.count == 1 ? (s.parent ?? "") : nil
        case "kind": return path.count == 1 ? s.kind.rawValue : nil
        case "labels": return path.count > 1 ? s.labels[path.dropFirst().joined(separator: ".")] : nil
        default: return nil
        }
    }

    static func matches(_ selector: Selector, _ s: LayerStore.Snapshot) -> Bool {
        let value = field(selector.path, s)
        switch selector.op {
        case .present: return value.map { !$0.isEmpty } ?? false
        case .equal: return value == selector.value
        case .notEqual: return value != selector.value
        case .matches:
            guard let value, let regex = selector.regex else { return false }
            return regex.matches(value)
        }
    }

    // MARK: Parser

    static func parse(_ text: String) throws -> [Selector] {
        var p = Parser(text: text, chars: Array(text.unicodeScalars))
        var selectors: [Selector] = []
        repeat {
            p.skipSpace()
            selectors.append(try p.selector())
            p.skipSpace()
        } while p.consume(",")
        guard p.atEnd else { throw p.error("expected \",\" or the end") }
        return selectors
    }

    struct Parser {
        let text: String
        let chars: [Unicode.Scalar]
        var i = 0

        var atEnd: Bool { i >= chars.count }
        func error(_ reason: String) -> Error { .syntax(filter: text, position: i, reason: reason) }

        mutating func skipSpace() {
            while !atEnd, chars[i].properties.isWhitespace { i += 1 }
        }

        mutating func consume(_ s: String) -> Bool {
            let scalars = Array(s.unicodeScalars)
            guard i + scalars.count <= chars.count, Array(chars[i..<i + scalars.count]) == scalars else { return false }
            i += scalars.count
            return true
        }

        mutating func selector() throws -> Selector {
            var path = [try field()]
            while consume(".") { path.append(try field()) }
            skipSpace()
            let op: Operator
            if consume("==") { op = .equal } else if consume("!=") { op = .notEqual } else if consume("~=") { op = .matches } else {
                return Selector(path: path, op: .present, value: "", regex: nil)
            }
            skipSpace()
            let value = try self.value()
            var regex: RE2Pattern?
            if op == .matches {
                do { regex = try RE2Pattern(value) } catch { throw self.error("bad regular expression \(value.debugDescription): \(error.reason)") }
            }
            return Selector(path: path, op: op, value: value, regex: regex)
        }

        static func isIdentifier(_ c: Unicode.Scalar) -> Bool {
            c.properties.isAlphabetic || c.properties.numericType != nil || c == "_"
        }

        mutating func field() throws -> String {
            if !atEnd, chars[i] == "\"" || chars[i] == "`" { return try quoted() }
            let start = i
            while !atEnd, Self.isIdentifier(chars[i]) { i += 1 }
            guard i > start else { throw error("expected a field name") }
            return String(String.UnicodeScalarView(chars[start..<i]))
        }

        mutating func value() throws -> String {
            if !atEnd, chars[i] == "\"" || chars[i] == "`" { return try quoted() }
            let start = i
            while !atEnd, chars[i] != ",", !chars[i].properties.isWhitespace { i += 1 }
            guard i > start else { throw error("expected a value") }
            return String(String.UnicodeScalarView(chars[start..<i]))
        }

        /// A Go-style quoted string: "..." with backslash escapes, or `...` raw.
        mutating func quoted() throws -> String {
            let quote = chars[i]
            i += 1
            var out = String.UnicodeScalarView()
            while !atEnd {
                let c = chars[i]
                i += 1
                if c == quote { return String(out) }
                if c == "\\" && quote == "\"" {
                    guard !atEnd else { break }
                    let e = chars[i]
                    i += 1
                    switch e {
                    case "n": out.append("\n")
                    case "t": out.append("\t")
                    case "r": out.append("\r")
                    case "0": out.append("\0")
                    default: out.append(e)
                    }
                } else {
                    out.append(c)
                }
            }
            throw error("unterminated quoted string")
        }
    }
}
