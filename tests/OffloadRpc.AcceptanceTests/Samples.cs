using OffloadRpc.Tests.Infrastructure;

namespace OffloadRpc.Tests;

/// <summary>The repository's samples, run as a user runs them: built next to these tests, started with <c>dotnet exec</c>.</summary>
internal static class Samples
{
    /// <summary>The repository's root (these tests run from tests/OffloadRpc.AcceptanceTests/bin/{configuration}/{framework}).</summary>
    public static readonly string Repository = Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "..", "..", "..", "..", ".."));

    /// <summary>Runs samples/<paramref name="name"/> (built in this test run's configuration and framework) and returns its exit code and output.</summary>
    public static Task<(int ExitCode, string Output)> RunAsync(string name, string[] arguments, TimeSpan timeout)
    {
        string here = AppContext.BaseDirectory.TrimEnd('/');
        string framework = Path.GetFileName(here);
        string configuration = Path.GetFileName(Path.GetDirectoryName(here)!);
        string sample = Path.Combine(Repository, "samples", name, "bin", configuration, framework, name + ".dll");
        string dotnet = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host) ? host : "dotnet";
        return ProcessRunner.RunAsync(dotnet, ["exec", sample, .. arguments], timeout);
    }
}
