using OffloadRpc.Transport;

namespace OffloadRpc.Tests.Infrastructure;

internal static class Endpoints
{
    private static int s_counter;

    /// <summary>A fresh endpoint name, unique to this test run.</summary>
    public static string Unique(string purpose) => $"t{Environment.ProcessId}-{Interlocked.Increment(ref s_counter)}-{purpose}";

    /// <summary>Removes the socket files a killed server could not remove itself (its gRPC Unix socket, <c>.grpc</c>, too).</summary>
    public static void RemoveStale(string endpoint)
    {
        string path = EndpointPath.Resolve(endpoint);
        foreach (string socket in new[] { path, path + ".grpc" })
        {
            if (File.Exists(socket))
            {
                File.Delete(socket);
            }
        }
    }
}

/// <summary>A server started in another process, and a connection of this process to it.</summary>
internal sealed class RemoteServer : IAsyncDisposable
{
    private RemoteServer(PeerProcess process, string endpoint)
    {
        Process = process;
        Endpoint = endpoint;
    }

    public PeerProcess Process { get; }

    public string Endpoint { get; }

    public static RemoteServer Start(string purpose, params string[] extra)
    {
        string endpoint = Endpoints.Unique(purpose);
        PeerProcess process = PeerProcess.Start(["server", endpoint, .. extra]);
        process.WaitForLine("READY");
        return new RemoteServer(process, endpoint);
    }

    public Task<RpcConnection> ConnectAsync(TransportOptions? options = null) =>
        Handshake.ConnectAsync(Endpoint, options ?? new TransportOptions(), [], null, CancellationToken.None);

    public async ValueTask DisposeAsync()
    {
        await Process.DisposeAsync();
        Endpoints.RemoveStale(Endpoint);
    }
}
