using System.Runtime.CompilerServices;
using System.Text;
using Xunit.Sdk;

namespace OffloadRpc.Generators.Tests;

/// <summary>
/// Compares generated sources with the checked-in files under Golden/&lt;case&gt;/&lt;hint name&gt;, read
/// from the source tree (not bin). With OFFLOADRPC_UPDATE_GOLDEN=1 it rewrites them instead, deletes
/// files the generator no longer produces, and passes.
/// </summary>
internal static class Golden
{
    public const string UpdateVariable = "OFFLOADRPC_UPDATE_GOLDEN";

    public static bool Updating => Environment.GetEnvironmentVariable(UpdateVariable) == "1";

    public static void Verify(string caseName, IReadOnlyDictionary<string, string> sources, [CallerFilePath] string callerFile = "")
    {
        string directory = Path.Combine(ProjectDirectory(callerFile), "Golden", caseName);
        if (Updating)
        {
            Update(directory, sources);
            return;
        }

        var failures = new List<string>();
        if (!Directory.Exists(directory))
        {
            failures.Add($"The golden directory '{directory}' does not exist.");
        }
        else
        {
            foreach (string stale in Directory.EnumerateFiles(directory).Select(Path.GetFileName).Where(name => !sources.ContainsKey(name!)).Order(StringComparer.Ordinal)!)
            {
                failures.Add($"{stale}: golden file exists but the generator no longer produces this source.");
            }
        }

        foreach ((string hintName, string actual) in sources.OrderBy(s => s.Key, StringComparer.Ordinal))
        {
            string path = Path.Combine(directory, hintName);
            if (!File.Exists(path))
            {
                failures.Add($"{hintName}: generated, but there is no golden file '{path}'.");
                continue;
            }

            string expected = GeneratorHarness.NormalizeNewLines(File.ReadAllText(path));
            if (FirstDifference(expected, GeneratorHarness.NormalizeNewLines(actual)) is { } difference)
            {
                failures.Add($"{hintName}: differs from '{path}'{Environment.NewLine}{difference}");
            }
        }

        if (failures.Count > 0)
        {
            throw new XunitException(
                $"Generated sources of golden case '{caseName}' do not match (run the tests with {UpdateVariable}=1 to accept the new output, then review the diff):"
                + Environment.NewLine + string.Join(Environment.NewLine + Environment.NewLine, failures));
        }
    }

    /// <summary>A description of the first line where the texts differ, or null when they are equal.</summary>
    public static string? FirstDifference(string expected, string actual)
    {
        if (string.Equals(expected, actual, StringComparison.Ordinal))
        {
            return null;
        }

        string[] expectedLines = expected.Split('\n');
        string[] actualLines = actual.Split('\n');
        int count = Math.Max(expectedLines.Length, actualLines.Length);
        for (int i = 0; i < count; i++)
        {
            string? e = i < expectedLines.Length ? expectedLines[i] : null;
            string? a = i < actualLines.Length ? actualLines[i] : null;
            if (!string.Equals(e, a, StringComparison.Ordinal))
            {
                return new StringBuilder()
                    .AppendLine($"  first difference at line {i + 1} (expected {expectedLines.Length} lines, actual {actualLines.Length}):")
                    .AppendLine($"  - expected: {(e is null ? "<end of file>" : Visible(e))}")
                    .Append($"  + actual:   {(a is null ? "<end of file>" : Visible(a))}")
                    .ToString();
            }
        }

        return "  the texts differ only in a way that Split('\\n') does not show";
    }

    private static string Visible(string line) => line.Replace("\t", "\\t", StringComparison.Ordinal);

    private static void Update(string directory, IReadOnlyDictionary<string, string> sources)
    {
        Directory.CreateDirectory(directory);
        foreach (string file in Directory.EnumerateFiles(directory))
        {
            if (!sources.ContainsKey(Path.GetFileName(file)))
            {
                File.Delete(file);
            }
        }

        foreach ((string hintName, string text) in sources)
        {
            string path = Path.Combine(directory, hintName);
            string normalized = GeneratorHarness.NormalizeNewLines(text);
            if (!File.Exists(path) || GeneratorHarness.NormalizeNewLines(File.ReadAllText(path)) != normalized)
            {
                File.WriteAllText(path, normalized, new UTF8Encoding(encoderShouldEmitUTF8Identifier: false));
            }
        }
    }

    /// <summary>
    /// The test project's source directory: beside the calling test file, or, when the build mapped
    /// source paths away (PathMap, deterministic CI builds), found by walking up from bin.
    /// </summary>
    private static string ProjectDirectory(string callerFile)
    {
        const string ProjectFile = "OffloadRpc.Generators.Tests.csproj";
        string? fromCaller = Path.GetDirectoryName(callerFile);
        if (fromCaller is not null && File.Exists(Path.Combine(fromCaller, ProjectFile)))
        {
            return fromCaller;
        }

        for (DirectoryInfo? dir = new(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, ProjectFile)))
            {
                return dir.FullName;
            }
        }

        throw new InvalidOperationException($"Cannot find the source directory of {ProjectFile} (caller file '{callerFile}', base directory '{AppContext.BaseDirectory}').");
    }
}
