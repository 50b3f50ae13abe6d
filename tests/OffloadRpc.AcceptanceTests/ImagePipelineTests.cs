using System.Text.RegularExpressions;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// samples/ImagePipeline, the README's main job, as a user runs it with <c>--quick --grpc</c>: a client and
/// a worker process (an ASP.NET Core app serving both ways), the same client code first over gRPC on
/// 127.0.0.1 and then, given the same address with the locality switch on, over shared memory. The sample
/// checks every result against its own reference (histograms and thumbnails byte for byte, statistics within
/// 1e-3) before it times anything, and exits 1 when one differs; the timings are not checked here.
/// </summary>
public sealed partial class ImagePipelineTests
{
    private static readonly string[] Checks = ["ping", "histogram", "batch stats", "thumbnail", "frame stream", "bad call"];

    [Fact]
    public async Task The_main_job_verifies_its_results_over_gRPC_and_then_over_shared_memory_after_the_switch()
    {
        (int exit, string output) = await Samples.RunAsync("ImagePipeline", ["--quick", "--grpc"], TimeSpan.FromMinutes(4));
        Assert.True(exit == 0, output);
        string text = Whitespace().Replace(AnsiEscape().Replace(output, string.Empty), " "); // colours, if the console thinks it has them; wrapped lines

        int overGrpc = text.IndexOf("PreferSharedMemory = False: calls go over gRPC (HTTP/2 on 127.0.0.1)", StringComparison.Ordinal);
        int overSharedMemory = text.IndexOf("PreferSharedMemory = True: calls go over shared memory", StringComparison.Ordinal);
        Assert.True(overGrpc >= 0 && overSharedMemory > overGrpc, "first over gRPC, then switched to shared memory:\n" + output);
        foreach (string check in Checks)
        {
            // Each check passed on each transport: once before the switch, once after.
            Assert.True(Passed(text[..overSharedMemory], check) && Passed(text[overSharedMemory..], check), $"verify {check} ok on both transports:\n{output}");
        }

        Assert.DoesNotContain("FAILED", text, StringComparison.Ordinal);
        Assert.Contains("over OffloadRpc (gRPC, HTTP/2 on 127.0.0.1)", text, StringComparison.Ordinal); // each table names its transport
        Assert.Contains("over OffloadRpc (shared memory)", text, StringComparison.Ordinal);
    }

    private static bool Passed(string text, string check) => Regex.IsMatch(text, $@"verify {Regex.Escape(check)} +ok ");

    [GeneratedRegex(@"\s+")]
    private static partial Regex Whitespace();

    [GeneratedRegex(@"\x1b\[[0-9;]*m")]
    private static partial Regex AnsiEscape();
}
