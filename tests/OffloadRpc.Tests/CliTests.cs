using System.Diagnostics;
using System.Text.Json;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>The offloadrpc tool, run as a user would run it.</summary>
public sealed class CliTests
{
    [Fact]
    public async Task Doctor_checks_every_mechanism_for_real_and_reports_them_as_json()
    {
        string here = AppContext.BaseDirectory.TrimEnd('/');
        string cli = Path.GetFullPath(Path.Combine(here, "..", "..", "..", "..", "..", "src", "OffloadRpc.Cli", "bin", Path.GetFileName(Path.GetDirectoryName(here))!, Path.GetFileName(here), "OffloadRpc.Cli.dll"));
        var info = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string a in new[] { "exec", cli, "doctor", "--json" })
        {
            info.ArgumentList.Add(a);
        }

        using Process process = Process.Start(info)!;
        string output = await process.StandardOutput.ReadToEndAsync();
        await process.WaitForExitAsync().WaitAsync(TimeSpan.FromMinutes(1));

        using JsonDocument document = JsonDocument.Parse(output);
        var findings = document.RootElement.EnumerateArray().ToDictionary(f => f.GetProperty("check").GetString()!, f => (Verdict: f.GetProperty("verdict").GetString(), Detail: f.GetProperty("detail").GetString()));
        Assert.Equal("ok", findings["memfd + seals"].Verdict);
        Assert.Equal("ok", findings["loopback connection"].Verdict);
        Assert.Contains("4 MiB echo verified", findings["loopback connection"].Detail);
        Assert.True(findings.ContainsKey("Intel DSA"));
        Assert.DoesNotContain(findings.Values, f => f.Verdict == "fail");
        Assert.Equal(0, process.ExitCode);
    }
}
