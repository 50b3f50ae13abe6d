using System.Text.RegularExpressions;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>samples/HostedWorker as a user runs it: a Generic Host server process and a client, one trace across both.</summary>
public sealed partial class HostedWorkerTests
{
    private static readonly string Repository = Samples.Repository;

    [Fact]
    public async Task The_hosted_worker_sample_shows_one_trace_across_both_processes()
    {
        (int exit, string output) = await Samples.RunAsync("HostedWorker", ["demo", $"t{Environment.ProcessId}-hosted-worker"], TimeSpan.FromMinutes(2));
        Assert.True(exit == 0, output);
        Assert.Contains("Hello world (tenant acme, greeting #1", output, StringComparison.Ordinal);
        Assert.Contains("As expected: /HostedWorker.IGreeter/SlowAsync did not complete before its deadline", output, StringComparison.Ordinal);
        Assert.Contains("Refused by the server's interceptor: System.UnauthorizedAccessException", output, StringComparison.Ordinal);

        string[] lines = output.Split('\n');
        string[] serverTraces = [.. lines.Select(l => TraceId().Match(l)).Where(m => m.Success && m.Groups[1].Success).Select(m => m.Groups[2].Value).Distinct()];
        string[] clientTraces = [.. lines.Select(l => TraceId().Match(l)).Where(m => m.Success && !m.Groups[1].Success).Select(m => m.Groups[2].Value).Distinct()];
        Assert.Single(clientTraces);                                  // the worker's one batch
        Assert.Equal(clientTraces, serverTraces);                     // the server's spans belong to the same trace

        // The server's metrics, exported when its host stops: the calls it served, by method and status.
        Assert.Contains("[server] Metric Name: rpc.server.duration,", output, StringComparison.Ordinal);
        Assert.Contains("[server] Metric Name: offloadrpc.server.calls.completed,", output, StringComparison.Ordinal);
        Assert.Contains(lines, l => l.StartsWith("[server] ", StringComparison.Ordinal) && l.Contains("rpc.method: SlowAsync", StringComparison.Ordinal) && l.Contains("rpc.offloadrpc.status_code: deadline_exceeded", StringComparison.Ordinal));
    }

    /// <summary>README's "In an application" shows the sample's code: every code line of its block is a line of the sample (comments aside).</summary>
    [Fact]
    public void The_readme_section_In_an_application_shows_the_samples_own_code()
    {
        string readme = File.ReadAllText(Path.Combine(Repository, "README.md"));
        int section = readme.IndexOf("\n## In an application\n", StringComparison.Ordinal);
        Assert.True(section >= 0, "README has a section \"In an application\"");
        int start = readme.IndexOf("```csharp\n", section, StringComparison.Ordinal) + "```csharp\n".Length;
        string block = readme[start..readme.IndexOf("\n```", start, StringComparison.Ordinal)];

        HashSet<string> sample = [.. Directory.GetFiles(Path.Combine(Repository, "samples", "HostedWorker"), "*.cs").SelectMany(File.ReadAllLines).Select(Code)];
        string[] shown = [.. block.Split('\n').Select(Code).Where(l => l.Length > 0)];
        Assert.True(shown.Length > 30, block);
        string[] missing = [.. shown.Where(l => !sample.Contains(l))];
        Assert.True(missing.Length == 0, "README lines not in samples/HostedWorker:\n" + string.Join('\n', missing));
        foreach (string name in new[] { "AddOffloadRpcServer(", ".AddService<", ".AddInterceptor<", "AddOffloadRpcClient<", "RequestHeaders[", "WithHeader(", "WithDeadline(", "DeadlineExceededException", "AddConsoleExporter()" })
        {
            Assert.Contains(shown, l => l.Contains(name, StringComparison.Ordinal));
        }
    }

    /// <summary>A line as code: without its trailing comment and surrounding blanks ("" for a comment line).</summary>
    private static string Code(string line)
    {
        bool inString = false;
        for (int i = 0; i < line.Length - 1; i++)
        {
            if (line[i] == '"')
            {
                inString = !inString;
            }
            else if (!inString && line[i] == '/' && line[i + 1] == '/')
            {
                return line[..i].Trim();
            }
        }

        return line.Trim();
    }

    [GeneratedRegex(@"^(\[server\] )?Activity\.TraceId:\s+([0-9a-f]{32})")]
    private static partial Regex TraceId();
}
