using System.Diagnostics;
using OffloadRpc;

// Two processes, one binary: `AotPing serve ENDPOINT` and `AotPing call ENDPOINT`. Published with
// NativeAOT, it shows that GetService/Register and the generated proxy and stub need no reflection.
// `AotPing call http://HOST:PORT [--stay-on-grpc]` calls a server of IPing over gRPC instead (the test
// peer serves it): switched to the server's shared memory when it is on this host, unless told to stay.
namespace AotPing;

internal static class Program
{
    public static async Task<int> Main(string[] args)
    {
        if (args.Length == 2 && args[0] == "serve")
        {
            await using var server = new OffloadRpcServer(args[1]);
            server.Register<IPing>(new Ping());
            await server.StartAsync();
            Console.WriteLine("READY");
            await Task.Run(() => Console.In.ReadToEnd());
            return 0;
        }

        if (args is ["call", _] or ["call", _, "--stay-on-grpc"])
        {
            var options = new OffloadRpcOptions { PreferSharedMemory = args.Length == 2 };
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(args[1], options);
            IPing ping = connection.GetService<IPing>();
            int sum = await ping.AddAsync(40, 2);
            string greeting = await ping.GreetAsync("aot");
            byte[] data = new byte[8 << 20];
            for (int i = 0; i < data.Length; i++)
            {
                data[i] = (byte)i;
            }

            ulong expected = 0;
            foreach (byte b in data)
            {
                expected += b;
            }

            ulong remote = await ping.SumAsync(data);
            byte[] reversed = await ping.ReverseAsync([1, 2, 3]);
            using SharedBuffer filled = await ping.FillAsync(1 << 20, 7);
            bool ok = sum == 42 && remote == expected && reversed.SequenceEqual(new byte[] { 3, 2, 1 }) && filled.Length == 1 << 20 && filled.Span.IndexOfAnyExcept((byte)7) < 0;
            Console.WriteLine($"add={sum} sum={remote}/{expected} reversed={string.Join(",", reversed)} filled={filled.Length} greeting=\"{greeting}\" server-pid={connection.PeerProcessId} via {connection}");
            Console.WriteLine(ok ? "AOT OK" : "AOT WRONG");
            return ok ? 0 : 1;
        }

        Console.Error.WriteLine("usage: AotPing serve ENDPOINT | AotPing call ENDPOINT | AotPing call http://HOST:PORT [--stay-on-grpc]");
        return 2;
    }
}
