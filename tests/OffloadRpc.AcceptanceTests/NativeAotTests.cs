using System.Diagnostics;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// GetService/Register and the generated proxies and stubs need no reflection: samples/AotPing is
/// published with NativeAOT and run as a server process and a client process; the same binary then calls
/// a gRPC server process (the test peer) over gRPC, and switched to its shared memory.
/// </summary>
public sealed class NativeAotTests
{
    [Fact]
    public async Task A_NativeAOT_published_sample_serves_and_calls_across_two_processes()
    {
        string repository = Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "..", "..", "..", "..", ".."));
        string project = Path.Combine(repository, "samples", "AotPing", "AotPing.csproj");
        Assert.True(File.Exists(project), project);
        string output = Path.Combine(Path.GetTempPath(), $"offloadrpc-aot-{Environment.ProcessId}");
        try
        {
            (int publishExit, string publishLog) = await ProcessRunner.RunAsync(
                Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet",
                // PublishAot is set in the project file: a global -p:PublishAot would reach the netstandard2.0 generator too.
                ["publish", project, "-c", "Release", "-r", "linux-x64", "-o", output, "-nologo"],
                TimeSpan.FromMinutes(10));
            Assert.True(publishExit == 0, "dotnet publish -p:PublishAot=true failed:\n" + publishLog);
            string binary = Path.Combine(output, "AotPing");
            Assert.True(File.Exists(binary), "no native binary in " + output);

            string endpoint = Endpoints.Unique("aot");
            using var server = Process.Start(new ProcessStartInfo(binary, ["serve", endpoint]) { RedirectStandardInput = true, RedirectStandardOutput = true, UseShellExecute = false })!;
            try
            {
                Assert.Equal("READY", await server.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(30)));
                (int callExit, string callLog) = await ProcessRunner.RunAsync(binary, ["call", endpoint], TimeSpan.FromSeconds(60));
                Assert.True(callExit == 0, callLog);
                Assert.Contains("AOT OK", callLog);
                Assert.Contains("add=42", callLog);
            }
            finally
            {
                server.StandardInput.Close();
                if (!server.WaitForExit(10_000))
                {
                    server.Kill();
                }

                Endpoints.RemoveStale(endpoint);
            }

            // The gRPC client (OffloadRpc.Grpc.Client) under NativeAOT too: its transport is found by name,
            // its frames and Describe answer are read without reflection, and the switch maps shared memory.
            string grpcEndpoint = Endpoints.Unique("aot-grpc");
            try
            {
                await using PeerProcess grpcServer = PeerProcess.Start(["grpc-server", grpcEndpoint]);
                string address = grpcServer.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2];
                (int stayedExit, string stayedLog) = await ProcessRunner.RunAsync(binary, ["call", address, "--stay-on-grpc"], TimeSpan.FromSeconds(60));
                Assert.True(stayedExit == 0, stayedLog);
                Assert.Contains("AOT OK", stayedLog);
                Assert.Contains($"via OffloadRpcConnection(grpc {address}, connected)", stayedLog);
                (int switchedExit, string switchedLog) = await ProcessRunner.RunAsync(binary, ["call", address], TimeSpan.FromSeconds(60));
                Assert.True(switchedExit == 0, switchedLog);
                Assert.Contains("AOT OK", switchedLog);
                Assert.Contains($"via OffloadRpcConnection(server pid {grpcServer.Id}, connected)", switchedLog);
            }
            finally
            {
                Endpoints.RemoveStale(grpcEndpoint);
            }
        }
        finally
        {
            if (Directory.Exists(output))
            {
                Directory.Delete(output, recursive: true);
            }
        }
    }
}
