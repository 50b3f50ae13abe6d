using System.Text.RegularExpressions;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>samples/HostedWorker as a user runs it: a Generic Host server process and a client, one trace across both.</summary>
public sealed partial class HostedWorkerTests
{
    [Fact]
    public async Task The_hosted_worker_sample_shows_one_trace_across_both_processes()
    {
        string here = AppContext.BaseDirectory.TrimEnd('/');
        string framework = Path.GetFileName(here);
        string configuration = Path.GetFileName(Path.GetDirectoryName(here)!);
        string repository = Path.GetFullPath(Path.Combine(here, "..", "..", "..", "..", ".."));
        string sample = Path.Combine(repository, "samples", "HostedWorker", "bin", configuration, framework, "HostedWorker.dll");
        string dotnet = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host) ? host : "dotnet";

        (int exit, string output) = await ProcessRunner.RunAsync(dotnet, ["exec", sample, "demo", $"t{Environment.ProcessId}-hosted-worker"], TimeSpan.FromMinutes(2));
        Assert.True(exit == 0, output);
        Assert.Contains("Hello world (tenant acme, greeting #1", output, StringComparison.Ordinal);
        Assert.Contains("As expected: /HostedWorker.IGreeter/SlowAsync did not complete before its deadline", output, StringComparison.Ordinal);
        Assert.Contains("Refused by the server's interceptor: System.UnauthorizedAccessException", output, StringComparison.Ordinal);

        string[] lines = output.Split('\n');
        string[] serverTraces = [.. lines.Select(l => TraceId().Match(l)).Where(m => m.Success && m.Groups[1].Success).Select(m => m.Groups[2].Value).Distinct()];
        string[] clientTraces = [.. lines.Select(l => TraceId().Match(l)).Where(m => m.Success && !m.Groups[1].Success).Select(m => m.Groups[2].Value).Distinct()];
        Assert.Single(clientTraces);                                  // the worker's one batch
        Assert.Equal(clientTraces, serverTraces);                     // the server's spans belong to the same trace
    }

    [GeneratedRegex(@"^(\[server\] )?Activity\.TraceId:\s+([0-9a-f]{32})")]
    private static partial Regex TraceId();
}
