using System.Collections.Concurrent;
using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>Who may connect (SO_PEERCRED), handshake mismatches, and what the transport leaves on disk.</summary>
public sealed class SecurityTests
{
    private const uint Nobody = 65534;

    private static string WorldWritableDirectory()
    {
        string directory = Path.Combine(Path.GetTempPath(), $"offloadrpc-uidtest-{Environment.ProcessId}-{Guid.NewGuid():N}"[..40]);
        Directory.CreateDirectory(directory);
        File.SetUnixFileMode(directory, (UnixFileMode)0b111_111_111);
        return directory;
    }

    [Fact]
    public async Task A_server_running_as_another_uid_is_refused_unless_allowed()
    {
        Assert.Equal(0u, Interop.LinuxNative.GetEuid()); // the tests start peers under another uid with setpriv, which needs root
        string directory = WorldWritableDirectory();
        string path = Path.Combine(directory, "s.sock");
        try
        {
            await using PeerProcess server = PeerProcess.Start(["server", path, "--allow-uid", "0"], asUser: Nobody);
            server.WaitForLine("READY");

            var refused = await Assert.ThrowsAsync<UnauthorizedAccessException>(() => Handshake.ConnectAsync(path, new TransportOptions(), [], null, CancellationToken.None));
            Assert.Contains($"uid {Nobody}", refused.Message);

            // Allowed on both sides: memory crosses users through the passed descriptors.
            await using RpcConnection connection = await Handshake.ConnectAsync(path, new TransportOptions { AllowedUserIds = [Nobody] }, [], null, CancellationToken.None);
            Assert.Equal(Nobody, connection.Peer.UserId);
            byte[] payload = new byte[3 << 20];
            Testing.Checksum64.Fill(payload, 4);
            using RpcReply reply = await connection.CallAsync(Testing.PeerMethods.Echo, "across users"u8, [OutboundPayload.Copy(payload)]);
            using SharedBuffer back = reply.TakePayload(0);
            Assert.Equal(Testing.Checksum64.Compute(payload), Testing.Checksum64.Compute(back.Span));
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Fact]
    public async Task A_client_running_as_another_uid_is_refused_by_the_server()
    {
        string directory = WorldWritableDirectory();
        string path = Path.Combine(directory, "s.sock");
        var failures = new ConcurrentQueue<Exception>();
        try
        {
            await using var server = new InProcessServer(failures, endpoint: path);
            File.SetUnixFileMode(path, (UnixFileMode)0b110_110_110);

            await using PeerProcess client = PeerProcess.Start(["client", path], asUser: Nobody);
            string line = client.WaitForLine("REFUSED");
            Assert.Contains("UnauthorizedAccessException", line);
            await Eventually.TrueAsync(() => !failures.IsEmpty, "the server reports the refusal");
            Assert.IsType<UnauthorizedAccessException>(Assert.Single(failures));
            Assert.Empty(server.Listener.Connections);
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Fact]
    public async Task A_protocol_version_mismatch_is_a_clear_exception_on_both_sides()
    {
        await using RemoteServer server = RemoteServer.Start("version");
        var ex = await Assert.ThrowsAsync<ContractMismatchException>(() => Handshake.ConnectAsync(server.Endpoint, new TransportOptions { ProtocolVersion = TransportProtocol.Version + 1 }, [], null, CancellationToken.None));
        Assert.Contains("Protocol version mismatch", ex.Message);
        Assert.Contains("FAILED OffloadRpc.ContractMismatchException: Protocol version mismatch", server.Process.WaitForLine("FAILED"));
    }

    [Fact]
    public async Task A_contract_mismatch_names_the_service_and_matching_or_unserved_contracts_connect()
    {
        await using RemoteServer server = RemoteServer.Start("contract", "--contract", "Images=1111");
        var mismatch = await Assert.ThrowsAsync<ContractMismatchException>(() => Handshake.ConnectAsync(server.Endpoint, new TransportOptions(), [new ContractDescriptor("Images", 2222)], null, CancellationToken.None));
        Assert.Equal("Images", mismatch.ServiceName);
        Assert.Contains("Images", mismatch.Message);

        // A service the server does not serve is no reason to refuse: the client learns what is served.
        await using (RpcConnection other = await Handshake.ConnectAsync(server.Endpoint, new TransportOptions(), [new ContractDescriptor("Audio", 1)], null, CancellationToken.None))
        {
            Assert.Equal(1111UL, other.PeerContracts["Images"]);
            Assert.False(other.PeerContracts.ContainsKey("Audio"));
        }

        await using RpcConnection ok = await Handshake.ConnectAsync(server.Endpoint, new TransportOptions(), [new ContractDescriptor("Images", 1111)], null, CancellationToken.None);
        using RpcReply reply = await ok.CallAsync(Testing.PeerMethods.Echo, "ok"u8, default);
        Assert.True(reply.Body.SequenceEqual("ok"u8));
    }

    [Fact]
    public async Task A_client_asking_for_oversized_rings_is_refused()
    {
        var failures = new ConcurrentQueue<Exception>();
        await using var server = new InProcessServer(failures);
        var ex = await Assert.ThrowsAsync<ProtocolViolationException>(() => server.ConnectAsync(new TransportOptions { SlotSize = 64 * 1024, SlotCount = 4096 }));
        Assert.Contains("exceed this server's limit", ex.Message);
        await Eventually.TrueAsync(() => !failures.IsEmpty, "the server reports the refusal");
    }

    [Fact]
    public async Task The_socket_directory_is_private_and_a_server_leaves_no_file_behind()
    {
        string directory = EndpointPath.UserDirectory();
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute, File.GetUnixFileMode(directory));
        string[] shmBefore = Directory.GetFileSystemEntries("/dev/shm");

        var failures = new ConcurrentQueue<Exception>();
        string endpoint = Endpoints.Unique("files");
        string socketPath = EndpointPath.Resolve(endpoint);
        Assert.StartsWith(directory, socketPath);
        await using (var server = new InProcessServer(failures, endpoint: endpoint))
        {
            Assert.True(File.Exists(socketPath));
            // A second server on the same endpoint is refused while the first listens.
            Assert.Throws<InvalidOperationException>(() => new InProcessServer(failures, endpoint: endpoint));
            await using RpcConnection connection = await server.ConnectAsync();
            using RpcReply reply = await connection.CallAsync(1, default, [OutboundPayload.Copy(new byte[32 << 20])]);
        }

        Assert.False(File.Exists(socketPath));
        Assert.Equal(shmBefore, Directory.GetFileSystemEntries("/dev/shm"));
    }

    [Fact]
    public async Task A_stale_socket_left_by_a_killed_server_is_replaced()
    {
        string endpoint = Endpoints.Unique("stale");
        PeerProcess killed = PeerProcess.Start(["server", endpoint]);
        killed.WaitForLine("READY");
        killed.Kill();
        await killed.WaitForExitAsync(TimeSpan.FromSeconds(10));
        await killed.DisposeAsync();
        Assert.True(File.Exists(EndpointPath.Resolve(endpoint)));

        await using var server = new InProcessServer(new ConcurrentQueue<Exception>(), endpoint: endpoint);
        await using RpcConnection connection = await server.ConnectAsync();
        using RpcReply reply = await connection.CallAsync(1, "fresh"u8, default);
        Assert.True(reply.Body.SequenceEqual("fresh"u8));
    }

    [Fact]
    public void Endpoint_names_are_validated()
    {
        Assert.Throws<ArgumentException>(() => EndpointPath.Resolve("a b"));
        Assert.Throws<ArgumentException>(() => EndpointPath.Resolve("name:with:colons"));
        Assert.Throws<ArgumentException>(() => EndpointPath.Resolve(".hidden"));
        Assert.Throws<ArgumentException>(() => EndpointPath.Resolve(new string('a', 65)));
        Assert.Throws<ArgumentException>(() => EndpointPath.Resolve("/tmp/" + new string('a', 120)));
        Assert.Equal("/tmp/x/y.sock", EndpointPath.Resolve("/tmp/x/y.sock"));
    }
}
