using System.Diagnostics;
using System.Text.Json;
using OffloadRpc.Cli;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// The peer benchmark (tests/OffloadRpc.PeerBench), run as a user runs it but with two small sizes
/// and short cells: gRPC, StreamJsonRpc and OffloadRpc servers in their own processes. The benchmark
/// checks every system's every result against a local checksum (and once more with a byte changed),
/// so a zero exit means the bytes really moved; this test checks the rows it writes.
/// </summary>
public sealed class PeerBenchTests
{
    private static readonly string[] Systems = ["grpc-uds", "offloadrpc-grpc", "streamjsonrpc-uds", "offloadrpc-auto", "offloadrpc-best", "offloadrpc-zero-copy"];

    [Fact]
    public async Task Every_system_answers_every_operation_correctly_and_gets_a_row_with_its_cpu_time()
    {
        string directory = Directory.CreateTempSubdirectory("offloadrpc-peerbench-").FullName;
        try
        {
            string json = Path.Combine(directory, "peers.json");
            string png = Path.Combine(directory, "peers.png");
            (int exit, string output) = await RunAsync("--systems", string.Join(',', Systems) + ",floor-memcpy", "--sizes", "64,1048576", "--cell-ms", "30", "--json", json, "--plot", png);
            Assert.True(exit == 0, output);
            Assert.Contains("Targets", output);

            using JsonDocument document = JsonDocument.Parse(await File.ReadAllTextAsync(json));
            JsonElement[] rows = document.RootElement.EnumerateArray().ToArray();
            foreach (string system in Systems)
            {
                JsonElement add = Assert.Single(rows, r => r.GetProperty("system").GetString() == system && r.GetProperty("op").GetString() == "add");
                Assert.True(add.GetProperty("p50_us").GetDouble() > 0);
                foreach (string op in new[] { "checksum", "touch" })
                {
                    foreach (long size in new long[] { 64, 1 << 20 })
                    {
                        JsonElement row = Assert.Single(rows, r => r.GetProperty("system").GetString() == system && r.GetProperty("op").GetString() == op && r.GetProperty("bytes").GetInt64() == size);
                        double p50 = row.GetProperty("p50_us").GetDouble();
                        Assert.True(p50 > 0 && row.GetProperty("p99_us").GetDouble() >= p50, row.ToString());
                        Assert.True(row.GetProperty("gbps").GetDouble() > 0, row.ToString());
                        Assert.True(row.GetProperty("calls_per_s").GetDouble() > 0, row.ToString());
                        Assert.True(row.GetProperty("client_cpu_us").GetDouble() > 0, row.ToString());
                        Assert.True(row.GetProperty("server_cpu_us").GetDouble() > 0, row.ToString());
                        Assert.Equal(system.StartsWith("offloadrpc", StringComparison.Ordinal), row.TryGetProperty("mode", out _));
                    }
                }
            }

            Assert.Equal(2, rows.Count(r => r.GetProperty("system").GetString() == "floor-memcpy"));
            Assert.True(new FileInfo(png).Length > 10_000);
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    /// <summary>
    /// <c>--clients 1,2</c> with short windows: per system one server and one, then two client
    /// processes; every client checks every reply, so a zero exit means every call was right. The
    /// figures are only checked for being there and agreeing with each other (a shared machine).
    /// </summary>
    [Fact]
    public async Task With_clients_every_system_gets_a_row_per_client_count_with_every_process_cpu_time()
    {
        string directory = Directory.CreateTempSubdirectory("offloadrpc-peerbench-clients-").FullName;
        try
        {
            string json = Path.Combine(directory, "clients.json");
            var clock = Stopwatch.StartNew();
            (int exit, string output) = await RunAsync("--clients", "1,2", "--window-ms", "400", "--warmup-ms", "300", "--json", json);
            Assert.True(exit == 0, output);
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"took {clock.Elapsed}");

            using JsonDocument document = JsonDocument.Parse(await File.ReadAllTextAsync(json));
            JsonElement[] rows = document.RootElement.EnumerateArray().ToArray();
            Assert.Equal(3 * 2 * 2, rows.Length);
            foreach (string system in new[] { "grpc-uds", "streamjsonrpc-uds", "offloadrpc-auto" })
            {
                foreach ((string op, long bytes) in new[] { ("add", 8L), ("checksum", 1L << 20) })
                {
                    JsonElement[] cells = rows.Where(r => r.GetProperty("system").GetString() == system && r.GetProperty("op").GetString() == op).ToArray();
                    foreach (int clients in new[] { 1, 2 })
                    {
                        ClientsRowChecks.Check(Assert.Single(cells, r => r.GetProperty("clients").GetInt32() == clients), clients, bytes);
                    }

                    ClientsRowChecks.CheckRatio(cells);
                }
            }
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    /// <summary>
    /// <c>--pairs 1</c>: plain gRPC and this library over gRPC served by one server process (or, with
    /// <c>--in-process</c>, by one app in the benchmark's own process), called in turns; every call's
    /// result is checked, so a zero exit means each was right. Here only the rows are checked.
    /// </summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Pairs_prints_a_ratio_row_per_operation(bool inProcess)
    {
        (int exit, string output) = inProcess ? await RunAsync("--pairs", "1", "--in-process") : await RunAsync("--pairs", "1");
        Assert.True(exit == 0, output);
        Assert.Contains(inProcess ? "in one process over TestServer" : "served by one process", output);
        foreach (string op in new[] { "add", "checksum", "touch" })
        {
            string row = Assert.Single(output.Split('\n'), line => line.StartsWith(op + " ", StringComparison.Ordinal));
            string[] cells = row.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            Assert.True(int.Parse(cells[1], System.Globalization.CultureInfo.InvariantCulture) > 0, row); // pairs of blocks
            Assert.True(double.Parse(cells[2], System.Globalization.CultureInfo.InvariantCulture) > 0 && double.Parse(cells[3], System.Globalization.CultureInfo.InvariantCulture) > 0, row); // us per call of each
            Assert.InRange(double.Parse(cells[5], System.Globalization.CultureInfo.InvariantCulture), 0.01, 100); // the median ratio
        }
    }

    [Fact]
    public async Task A_bad_argument_is_a_clear_error()
    {
        (int exit, string output) = await RunAsync("--systems", "grpc-tcp");
        Assert.Equal(2, exit);
        Assert.Contains("unknown system 'grpc-tcp'", output);

        (exit, output) = await RunAsync("--clients", "1,2", "--systems", "offloadrpc-best");
        Assert.Equal(2, exit);
        Assert.Contains("not 'offloadrpc-best'", output);

        // An output path that cannot be written is refused before minutes of measuring, not after.
        (exit, output) = await RunAsync("--quick", "--json", "/nonexistent-offloadrpc-dir/peers.json");
        Assert.Equal(2, exit);
        Assert.Contains("does not exist", output);
    }

    [Fact]
    public void The_checksum_covers_every_byte_and_its_position_and_is_the_same_in_pieces()
    {
        byte[] data = new byte[100_003];
        new Random(7).NextBytes(data);
        ulong whole = PayloadChecksum.Compute(data);

        var pieces = default(PayloadChecksum);
        var random = new Random(8);
        for (int position = 0; position < data.Length;)
        {
            int length = Math.Min(data.Length - position, random.Next(0, 70));
            pieces.Append(data.AsSpan(position, length));
            position += length;
        }

        Assert.Equal(whole, pieces.Finish());
        Assert.NotEqual(whole, PayloadChecksum.Compute(data.AsSpan(0, data.Length - 1)));
        foreach (int position in new[] { 0, 31, 32, 50_000, data.Length - 1 })
        {
            data[position] ^= 1;
            Assert.NotEqual(whole, PayloadChecksum.Compute(data));
            data[position] ^= 1;
        }

        (data[8], data[16]) = (data[16], data[8]); // the same bytes in another order
        Assert.NotEqual(whole, PayloadChecksum.Compute(data));
    }

    /// <summary>
    /// <c>--streams</c> with short windows: frames streamed as leases, as buffers lent in place and over gRPC
    /// (every frame's index checked as it arrives), then the 64 MiB checksums (each checked). Figures are only
    /// checked for being there and agreeing with each other.
    /// </summary>
    [Fact]
    public async Task Streams_gets_a_row_per_system_and_the_checksum_paths()
    {
        string directory = Directory.CreateTempSubdirectory("offloadrpc-peerbench-streams-").FullName;
        try
        {
            string json = Path.Combine(directory, "streams.json");
            (int exit, string output) = await RunAsync("--streams", "--quick", "--window-ms", "300", "--json", json);
            Assert.True(exit == 0, output);
            Assert.Contains("target SharedBuffer >= 50x gRPC", output);

            using JsonDocument document = JsonDocument.Parse(await File.ReadAllTextAsync(json));
            Assert.Equal(3840 * 2160 * 3, document.RootElement.GetProperty("frame_bytes").GetInt32());
            Assert.True(document.RootElement.GetProperty("unary64_microseconds").GetDouble() > 0);
            JsonElement[] frames = document.RootElement.GetProperty("frames").EnumerateArray().ToArray();
            Assert.Equal(["offloadrpc-sharedbuffer", "offloadrpc-readonlymemory", "grpc-uds-server-streaming"], frames.Select(r => r.GetProperty("system").GetString()));
            foreach (JsonElement row in frames)
            {
                int count = row.GetProperty("frames").GetInt32();
                double rate = row.GetProperty("frames_per_second").GetDouble();
                Assert.True(count > 0 && rate > 0, row.ToString());
                Assert.Equal(rate, count / row.GetProperty("seconds").GetDouble(), 6);
                Assert.Equal(1e6 / rate, row.GetProperty("microseconds_per_frame").GetDouble(), 6);
            }

            JsonElement[] checksums = document.RootElement.GetProperty("checksums").EnumerateArray().ToArray();
            // The floors, the unary path, and the pipelined Stream read two ways (ReadAsync into an array, CopyToAsync in place)
            // plus a Stream that cannot seek (sent through a ring), read in place.
            Assert.Equal(6, checksums.Length);
            Assert.Equal(2, checksums.Count(r => r.GetProperty("path").GetString()!.StartsWith("floor: ", StringComparison.Ordinal)));
            Assert.Single(checksums, r => r.GetProperty("path").GetString()!.StartsWith("offloadrpc unary", StringComparison.Ordinal));
            Assert.Equal(3, checksums.Count(r => r.GetProperty("path").GetString()!.StartsWith("offloadrpc pipelined Stream", StringComparison.Ordinal)));
            Assert.All(checksums, r => Assert.True(r.GetProperty("milliseconds").GetDouble() > 0 && r.GetProperty("bytes").GetInt64() == 64 << 20, r.ToString()));
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    private static async Task<(int ExitCode, string Output)> RunAsync(params string[] arguments)
    {
        string here = AppContext.BaseDirectory.TrimEnd('/');
        string bench = Path.GetFullPath(Path.Combine(here, "..", "..", "..", "..", "OffloadRpc.PeerBench", "bin", Path.GetFileName(Path.GetDirectoryName(here))!, Path.GetFileName(here), "OffloadRpc.PeerBench.dll"));
        var info = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        info.ArgumentList.Add("exec");
        info.ArgumentList.Add(bench);
        foreach (string argument in arguments)
        {
            info.ArgumentList.Add(argument);
        }

        using Process process = Process.Start(info)!;
        Task<string> output = process.StandardOutput.ReadToEndAsync();
        Task<string> errors = process.StandardError.ReadToEndAsync();
        try
        {
            await process.WaitForExitAsync().WaitAsync(TimeSpan.FromMinutes(3));
        }
        catch (TimeoutException)
        {
            process.Kill(entireProcessTree: true); // its servers too: a spinning leftover would starve the next tests
            throw;
        }

        return (process.ExitCode, await output + await errors);
    }
}
